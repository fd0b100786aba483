"""`python -m bench.suite`: the standard GPU benchmark in one command, and one folder to share.

What timm's results CSVs and MLPerf's result files are to their users: one command that measures a
GPU the standard way and leaves a folder (and the same folder as one .tar.gz beside it) that another
machine's can be compared with. The figures are ResNet-50 at 224 px in bf16, next to their targets
and to the matmul ceiling measured in the same run, with timm's own train benchmark run on the same
configuration as a peer.

Every step is its own subprocess (`sys.executable -m ...`) with its own time limit, so a step that
fails or hangs is recorded (status, return code, the end of its log) and the suite goes on. The steps
run in priority order within `--budget` seconds: a step whose limit no longer fits in what is left is
skipped and listed. suite.json and SUMMARY.md are rewritten after every step, so a suite stopped at
any moment leaves everything it finished.

`--rehearse` runs every step's real command at CPU size (ResNet-18, 32 px, a few steps), so that no
step is tried for the first time on a GPU.

    steps    the step table: each step's command, limits and skip condition; the two sizes
    parse    each step's outputs read back into figures
    figures  the targets and the figures checked against them
    summary  SUMMARY.md
    runner   a step in its own process group under its limit; the budget; suite.json and the .tar.gz
    probe    the environment step's own process: versions, matmul ceiling, copy bandwidth
    cli      the command line
"""
