"""AbsorberConfig: every knob of an absorption, with the paper's value where it gives one.

Absorber LLM (arXiv 2604.20915) fixes n = 1024, m = 2048, LoRA rank 64, AdamW lr 5e-4, an L1
loss on the residual hidden states of every layer, and early stop at eps = 2. It leaves the rest
open; each open choice is a field here, and its docstring says what we decided and why.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import ConfigError

PROBE_KINDS = ("question", "facts", "summary", "use", "creative", "recite")

OBJECTIVES = ("absorber", "ttt")
BACKENDS = ("auto", "torch", "triton")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")

# Upper bounds far past any real use, so every accepted value fits the C++ scheduler's int64 (the
# window n + m included), torch's seeds, allocations sized from it, float32 with room (AdamW's lr / 0.1).
_MAX_TOKENS = 2**24
_INT_LIMITS = {"chunk_tokens": _MAX_TOKENS, "sync_tokens": _MAX_TOKENS, "rank": 2**16, "max_steps": 2**31 - 1,
               "max_batch": 2**20, "max_resident": 2**20, "futures": 2**16, "kl_top_k": 2**31 - 1,
               "seed": 2**63 - 1, "probes": 2**16, "replay_rounds": 2**16, "replay_batch": 2**16,
               "memory_slots": 2**16, "recite_exact": 2**31 - 1}
_FLOAT_MAX = 1e30


@dataclass
class AbsorberConfig:
    chunk_tokens: int = 1024
    """n: tokens absorbed per round (X). The window slides by n after each round. With cuts (round_cut)
    n + m is also how much raw text stays in the window: SmolLM2-135M recommends 256 (one or two
    short documents raw; 59/96 against 55/96 of a held-out stream's questions at 512)."""

    sync_tokens: int = 2048
    """m: real continuation tokens (Y) each round synchronizes on. The raw window, and so the KV
    cache, never holds more than n + m tokens."""

    rank: int = 64
    """LoRA rank r of the delta A·B on each target linear."""

    alpha: float | None = None
    """LoRA alpha; the delta is scaled by alpha / rank. None means alpha = rank (scale 1), so the
    learning rate means the same thing at every rank. The paper does not state it."""

    targets: tuple[str, ...] | None = None
    """Names of the linears that get a delta, matched against the end of each module's dotted name
    ("c_proj" matches every c_proj, "mlp.c_proj" only the MLP's). None: the architecture's default
    (model.DEFAULT_TARGETS): for Llama-family models the attention's v/o and the MLP, not q/k, which
    measured far better in streaming (why, and the numbers, beside the table; the paper names none)."""

    prefix_bos: bool = True
    """Every sequence the engine starts reads the model's BOS token first, when the model has one
    and its tokenizer puts it in front of what it encodes (model.bos_token): the teacher
    reads BOS·X·Y, the student BOS·Y, the window BOS·window. Models trained that way lean on it (an
    attention sink). SmolLM2's config names a BOS its tokenizer never adds: no prefix there."""

    objective: str = "absorber"
    """"absorber": causal synchronization (the paper). "ttt": next-token loss on the context X
    itself, the test-time-training baseline, same delta, optimizer and step budget."""

    max_steps: int = 32
    """K: AdamW steps per round at most. The paper does not state K."""

    stop_loss: float = 0.0
    """eps: a round stops once its loss is below this. Our loss is a mean over positions, layers and
    hidden dimensions (not the paper's per-position sum): eps = 2 does not carry over; 0: never."""
    recite_exact: int = 0
    """k > 0, with the recite probe: a round whose delta after max_steps would not recite X (a token of X not
    the greedy pick by recital.RECITE_MARGIN) trains on, at most k steps, until it would. absorber-tiny's
    held-out key-value records at 8x: 72/75 recalled against 30/75 without (4x: 68/71, 63/71). 0: off."""

    surprise_gate: float = 0.0
    """Streams: a round trains only if its first loss is ≥ this × the median first loss of the stream's
    last 16 rounds after its first (rounds 1-2 always train; Titans' surprise), else it takes no step: it skips the filler
    around a pass key, and new text on alike rounds (tiny model, records at 4x: 5 of 7; docs/long_context.md). 0: off."""

    lr: float = 5e-4
    """AdamW learning rate on the delta (paper: 5e-4)."""
    weight_decay: float = 0.0
    """AdamW weight decay. 0 by default: decay would shrink what earlier rounds absorbed."""
    grad_clip: float = 0.0
    """Clip the delta's gradient to this global norm before each step; 0 disables."""

    futures: int = 0
    """Continuations sampled from the teacher after X, synchronized on with the real Y in the same
    student pass; a round with nothing else to synchronize on samples one. 0 by default: on
    SmolLM2-135M they added nothing to recall over the recite probe and next-token loss (24 questions:
    4 sampled probes + ntp 62.5%, recite + ntp 58%, ntp alone 62.5%) for 2-4x the time. The shipped
    3.4M model, which they helped, keeps 4 in its config."""
    future_tokens: int | None = None
    """Length of each sampled continuation. None: min(64, sync_tokens). At most sync_tokens, so the
    teacher's KV over X and a future stays within n + m tokens (sync_tokens = 0: n + future_tokens)."""
    futures_follow_y: bool = False
    """On: sampled futures continue X·Y and the student reads Y·future (the teacher X·Y·future), as
    generate() reads the window and then a prompt; the teacher's KV then spans n + m + future_tokens.
    Off (default): futures continue X, in Y's place, read alone. Shipped model, streamed passkeys: 4/6 vs 3/6."""
    future_prompt: str | tuple[int, ...] = ""
    """Text (or token ids) every sampled future starts with, read by the teacher right after X, as
    Cartridges' and LIFT's seed prompts: e.g. an opener of questions, so the futures ask and answer
    about what X says. "" (default): the futures continue X itself, as in the paper."""
    future_temperature: float = 1.0
    """Sampling temperature of the continuations; 1 samples the teacher's own distribution."""
    future_top_p: float = 1.0
    """Nucleus threshold when sampling continuations; 1 keeps the whole distribution."""

    probes: int = 1
    """Self-study probes per round (absorber_engine/probes.py): the teacher, reading X, answers seed
    instructions of the kinds in probe_kinds, and the student is synchronized on each exchange
    without X. They need a tokenizer (the seeds are text); without one a round uses only Y and
    futures. Read the measured effect in docs/recall.md."""

    probe_kinds: tuple[str, ...] = ("recite", "question", "facts", "summary", "use", "creative")
    """Kinds of seed instruction the probes are spread over, round-robin (probes.SEED_PROMPTS): with
    the default one probe, "recite" (the teacher re-reads X as its answer; no sampling). The sampled
    kinds follow Cartridges' seeds; a 135M model writes poor questions and answers to them (docs/recall.md)."""
    probe_tokens: int = 64
    """Most tokens the teacher writes in answer to one seed; a probe ends earlier at its turn's end."""
    probe_temperature: float = 1.0
    """Sampling temperature of the teacher's answers: its own distribution, for diverse probes."""
    probe_top_p: float = 1.0
    """Nucleus threshold when sampling the teacher's answers."""
    chat_probes: bool = True
    """Frame X and the probes in the tokenizer's chat template when it has one (X as a system
    message, each probe a user turn and the teacher's answer); plain text otherwise."""

    ntp_weight: float = 1.0
    """Weight of TTT's next-token cross-entropy on X itself, added to the synchronization loss. 1 by
    default: on SmolLM2-135M synchronization alone recalled 0-50% of facts where next-token training
    recalled 62% (seed 0, 24 questions); together, on held-out documents (seed 1, 48 questions), 72.9%
    against TTT's 52.1% at the same rank, steps and learning rate (docs/recall.md)."""

    ntp_in_recite: bool = True
    """Read the next-token loss off the recite probe's pass (the student reading the recite seed, then
    X: each token of X predicted from the one before it) instead of a pass of its own over X, when a
    round has a recite probe. SmolLM2-135M, 12 flushed documents (seed 3): 38/48 recalled against
    39/48 for the separate pass, with 26% less CPU time per document (41.7 s against 56.7 s)."""

    replay_rounds: int = 0
    """Streams: each round also replays the recite probes of this many earlier rounds (token ids, a bounded
    buffer kept with the session and its memory file), toward the round-start model's states on them (TTT:
    toward their tokens; replay.py). SmolLM2-135M, one round per document (12, seeds 7 and 9): 0/48 and 1/48
    recalled without, 8/48 and 10/48 with 4, all but one hit in the buffer. Costs a student pass over
    replay_rounds × (n + ~30) tokens more per step (replay_batch): about 3x a round's time. 0: off."""
    memory_slots: int = 1
    """Deltas a stream's memory keeps. 1 (the paper): every round trains the one delta. K > 1: each round
    trains a fresh delta from the base model, kept with the K - 1 latest before it (the oldest leaves); a
    query reads the delta that makes its prompt least surprising (routing.route). Rounds then never overwrite
    each other: SmolLM2-135M, one round per document, rank 4: 26/48 (seed 7) against 8/48 for one delta with
    replay, 63/96 on a held-out 24-document stream, as many 16-23 rounds old as 0-7 (docs/recall.md, "A delta
    per round"); 32 in its recommended config. Held memory grows a delta a round (bf16) up to K. Replay
    needs the one delta: replay_rounds = 0."""
    round_cut: str = ""
    """Text that may end a round early (e.g. "\n\n"): X ends after the first token holding it, or
    completing it with the token before, once X holds round_cut_min tokens, else at n (round_cuts.py).
    With memory_slots > 1 a delta then holds one document: SmolLM2-135M, 24 documents streamed as
    plain text (seed 17), 48.8% recalled cut at blank lines (m = 0) against 10.7% in rounds of 512. "": rounds of n."""
    round_cut_min: int | None = None
    """Shortest X a cut may leave. None: the tokens whose KV weighs one delta (86 for SmolLM2 at rank 4)."""

    replay_batch: int = 0
    """Replayed rounds the student reads per step, in turn, weighted so a cycle weighs what the whole
    buffer does; the targets of the whole buffer are computed once a round. 0: all of them each step."""

    hidden_weight: float = 1.0
    """Weight of the paper's loss: L1 between student and teacher residual hidden states h^0..h^L at
    every synchronized position, averaged over positions, layers and dimensions."""

    hidden_norm: bool = True
    """Divide each layer's L1 by the teacher's mean |h^l| (Deep Context Distillation), so all layers
    weigh the same; off, the paper's plain mean over layers, dominated by the late layers' large
    activations on real models."""

    kl_weight: float = 1.0
    """Weight of KL(teacher || student) on the next-token distributions, averaged over positions
    (this project's addition; the paper found hidden-state matching alone better; on the recite probe
    of a real model the teacher's distribution is what carries X's tokens)."""

    kl_temperature: float = 1.0
    """Softmax temperature of both distributions in the KL term (the loss is scaled by T^2)."""
    kl_top_k: int = 0
    """Restrict the teacher distribution to its top-k tokens in the KL term; 0 uses the vocabulary."""

    divergence_factor: float = 10.0
    """A round whose last loss exceeds this multiple (at least 1) of its first is rolled back as
    diverged; 0 disables the check. NaN or inf losses are always rolled back."""

    max_batch: int = 16
    """Sessions whose rounds one batched student pass may take at most (same shapes only)."""
    max_resident: int = 64
    """Sessions' deltas kept on the device at most; the scheduler moves the rest to host memory."""

    checkpoint_layers: bool = False
    """Recompute each decoder layer's activations in the student's backward instead of keeping them:
    the student's peak memory falls to about its layer inputs, for about one more forward per step."""

    compile_layers: bool = False
    """Run the student's passes through torch.compile'd decoder layers (inductor; backend "torch"); the
    first round compiles (tens of seconds; seconds from inductor's disk cache). docs/performance.md: "Compiled layers"."""

    cuda_graphs: bool = False
    """On a CUDA device, decode steps (the teacher's futures and probes, generate()) are captured once
    per batch as a CUDA graph and replayed (static_decode.py). Off until timed on a GPU (docs/performance.md, "On a GPU")."""

    compute_dtype: str = "auto"
    """dtype the matmuls of absorption run in (torch.autocast; the delta and AdamW stay fp32).
    "auto": bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX), else the model's
    dtype. "float32", "bfloat16", "float16" force it for an fp32 model (a 16-bit or float64 model
    absorbs in its own: autocast casts fp32 only). Generation runs in the model's dtype; the teacher's
    sampling steps read a copy of the weights in this dtype, held while they run."""

    backend: str = "auto"
    """"torch" (the PyTorch references: the CPU path), "triton" (the fused kernels; CUDA, or CPU
    under TRITON_INTERPRET=1), or "auto": triton on a CUDA device when it imports, else torch."""

    seed: int = 0
    """Seeds the delta's initialisation and the sampling of continuations, round by round."""

    def __post_init__(self) -> None:
        # Only shapes a user means are coerced (a name for a list, a list for a tuple); anything else
        # is left as given for validate() to refuse with the field's name.
        if isinstance(self.future_prompt, (list, tuple)):
            self.future_prompt = tuple(self.future_prompt)
        if isinstance(self.probe_kinds, (str, list)):
            self.probe_kinds = (self.probe_kinds,) if isinstance(self.probe_kinds, str) else tuple(self.probe_kinds)
        if isinstance(self.targets, (str, list)):
            self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            # float(v) first: an int past float's range (10**400) makes math.isfinite raise.
            return (isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= _FLOAT_MAX
                    and math.isfinite(float(v)))

        for name in ("chunk_tokens", "rank", "max_steps", "max_batch", "max_resident", "memory_slots"):
            v = getattr(self, name)
            need(is_int(v) and 0 < v <= _INT_LIMITS[name], f"{name} must be a positive integer "
                 f"(at most {_INT_LIMITS[name]}), got {v!r}")
        for name in ("sync_tokens", "futures", "kl_top_k", "seed", "probes", "replay_rounds", "replay_batch",
                     "recite_exact"):
            v = getattr(self, name)
            need(is_int(v) and 0 <= v <= _INT_LIMITS[name], f"{name} must be a non-negative integer "
                 f"(at most {_INT_LIMITS[name]}), got {v!r}")
        for name in ("stop_loss", "surprise_gate", "weight_decay", "grad_clip", "hidden_weight", "kl_weight",
                     "divergence_factor", "ntp_weight"):
            v = getattr(self, name)
            need(is_num(v) and v >= 0, f"{name} must be a finite number >= 0 (at most {_FLOAT_MAX:g}), got {v!r}")
        need(self.divergence_factor == 0 or self.divergence_factor >= 1, "divergence_factor must be 0 (off) or at "
             f"least 1: below 1 a round whose loss fell was rolled back, got {self.divergence_factor!r}")
        for name in ("lr", "kl_temperature", "future_temperature", "probe_temperature"):
            v = getattr(self, name)
            need(is_num(v) and v > 0, f"{name} must be a finite number > 0 (at most {_FLOAT_MAX:g}), got {v!r}")
        for name in ("prefix_bos", "futures_follow_y", "checkpoint_layers", "compile_layers", "hidden_norm",
                     "ntp_in_recite", "chat_probes", "cuda_graphs"):
            v = getattr(self, name)
            need(isinstance(v, bool), f"{name} must be true or false, got {v!r}")
        need(is_int(self.probe_tokens) and 0 < self.probe_tokens <= _MAX_TOKENS,
             f"probe_tokens must be a positive integer (at most {_MAX_TOKENS}), got {self.probe_tokens!r}")
        for name in ("probe_top_p", "future_top_p"):
            v = getattr(self, name)
            need(is_num(v) and 0 < v <= 1, f"{name} must be in (0, 1], got {v!r}")
        need(isinstance(self.probe_kinds, tuple) and len(self.probe_kinds) > 0
             and all(isinstance(k, str) and k in PROBE_KINDS for k in self.probe_kinds),
             f"probe_kinds must be a non-empty list of {PROBE_KINDS}, got {self.probe_kinds!r}")
        need(isinstance(self.round_cut, str), f"round_cut must be text, got {self.round_cut!r}")
        need(self.round_cut_min is None or (is_int(self.round_cut_min) and 0 < self.round_cut_min <= _MAX_TOKENS),
             f"round_cut_min must be None or a positive integer (at most {_MAX_TOKENS}), got {self.round_cut_min!r}")
        need(self.future_tokens is None or (is_int(self.future_tokens) and 0 < self.future_tokens <= _MAX_TOKENS),
             f"future_tokens must be None or a positive integer (at most {_MAX_TOKENS}), got {self.future_tokens!r}")
        need(self.alpha is None or (is_num(self.alpha) and self.alpha > 0),
             f"alpha must be None or a finite number > 0, got {self.alpha!r}")
        need(isinstance(self.objective, str) and self.objective in OBJECTIVES,
             f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        need(not self.recite_exact or (self.objective == "absorber" and "recite" in self.probe_kinds[:self.probes]),
             f"recite_exact ({self.recite_exact}) needs the absorber objective and a recite probe among the round's probes")
        need(isinstance(self.backend, str) and self.backend in BACKENDS,
             f"backend must be one of {BACKENDS}, got {self.backend!r}")
        need(isinstance(self.compute_dtype, str) and self.compute_dtype in COMPUTE_DTYPES,
             f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        need(self.targets is None or (isinstance(self.targets, tuple) and len(self.targets) > 0
                                      and all(isinstance(t, str) and t for t in self.targets)),
             f"targets must be None or a non-empty list of module names, got {self.targets!r}")
        if self.objective == "absorber":
            need(self.hidden_weight > 0 or self.kl_weight > 0,
                 "hidden_weight and kl_weight are both 0: the absorber objective would be empty")
            need(self.future_tokens is None or self.sync_tokens == 0 or self.future_tokens <= self.sync_tokens
                 or (self.futures == 0 and self.probes > 0),        # no future is ever sampled (round_span)
                 f"future_tokens ({self.future_tokens}) must not exceed sync_tokens ({self.sync_tokens}): "
                 "the teacher's KV over X plus a future must stay within chunk_tokens + sync_tokens")
            need(self.sync_tokens > 0 or self.futures > 0 or self.probes > 0,
                 "sync_tokens = 0, futures = 0 and probes = 0 leave a round nothing to synchronize on")
        need(self.memory_slots == 1 or self.replay_rounds == 0,
             f"replay_rounds ({self.replay_rounds}) holds one delta to its earlier answers; with memory_slots "
             f"({self.memory_slots}) > 1 no round changes an earlier round's delta: set replay_rounds to 0")
        need(isinstance(self.future_prompt, str)
             or (isinstance(self.future_prompt, tuple) and all(is_int(t) and 0 <= t < 2**63 for t in self.future_prompt)),
             f"future_prompt must be text or token ids, got {self.future_prompt!r}")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    @property
    def future_length(self) -> int:
        return self.future_tokens if self.future_tokens is not None else min(64, self.sync_tokens) or 64

    @property
    def window_tokens(self) -> int:
        return self.chunk_tokens + self.sync_tokens

    def replace(self, **changes) -> "AbsorberConfig":
        _refuse_unknown(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets) if self.targets is not None else None
        d["probe_kinds"] = list(self.probe_kinds)
        if not isinstance(self.future_prompt, str):
            d["future_prompt"] = list(self.future_prompt)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AbsorberConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a dict, got {type(d).__name__}")
        _refuse_unknown(d)
        return cls(**d)                    # lists for tuples: __post_init__ takes them


def _refuse_unknown(d: dict) -> None:
    unknown = set(d) - {f.name for f in dataclasses.fields(AbsorberConfig)}
    if unknown:
        raise ConfigError(f"unknown config fields: {sorted(repr(k) if not isinstance(k, str) else k for k in unknown)}")


# The paper's objective alone (hidden L1 on Y and futures, plain layer mean): benchmarks, shipped model.
PAPER_OBJECTIVE = dict(probes=0, ntp_weight=0.0, kl_weight=0.0, hidden_norm=False)
