"""Fuzz harnesses: one module per entry point, each checking one input against the contract.

The contract (README, "Bad input"): a call either succeeds or raises one of the engine's typed
errors (the CLI: one of its documented exit codes), the memory and window held before a refused
call are unchanged (the delta's bytes compared), and the process is still usable afterwards.

Every target module exposes the same four names, so hypothesis (tests/fuzz/test_fuzz.py) and atheris
(`python -m fuzz.campaign`) drive the same check:

    NAME            the target's name in statistics
    strategy()      a hypothesis strategy of structured inputs
    from_bytes(b)   the structured input a raw byte string decodes to (for coverage-guided fuzzing)
    check(inp)      runs one input; returns quietly, or raises (a crash or a contract violation)
"""

TARGETS = ("cli_input", "engine_args", "config_dict", "model_dir", "memory_file", "export_targets", "server_requests")
