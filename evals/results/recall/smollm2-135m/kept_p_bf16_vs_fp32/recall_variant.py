"""Run the facts evaluation with the KL's kept distribution forced to fp32 (the previous behaviour)."""
import sys
sys.path.insert(0, "/work/main")
import torch
from absorber_engine import teacher
if sys.argv[1] == "fp32":
    teacher._kept_dtype = lambda runner, final: torch.promote_types(final.dtype, torch.float32)
from evals.recall_eval import main
sys.exit(main(sys.argv[2:]))
