"""`python -m bench.suite`: the standard GPU benchmark, part by part, and one folder to share.

What timm's results CSVs and MLPerf's result files are to their users: one command that measures a
GPU the standard way and leaves a folder (each part also as one .tar.gz) that another
machine's can be compared with. The figures are ResNet-50 at 224 px in bf16, next to their targets
and to the matmul ceiling measured in the same run, with timm's own train benchmark run on the same
configuration as a peer.

Every step is its own subprocess (`sys.executable -m ...`) with its own time limit, so a step that
fails or hangs is recorded (status, return code, the end of its log) and the suite goes on. The steps
are grouped into parts, each of which fits one command on a lent GPU machine (600 s, only the files
under $OUT come back): `--part N` runs one, into OUT/part-N, and leaves one archive of at most 16 MiB;
the parts go in the order of value, torch-only first, DALI after, pytest alone. Each part's suite.json
and SUMMARY.md are rewritten after every step, so a part stopped at any moment leaves everything it
finished; OUT's own suite.json and SUMMARY.md merge every part found there (`--merge` does the same for
parts brought home).

`--rehearse` runs every step's real command at CPU size (ResNet-18, 32 px, a few steps), so that no
step is tried for the first time on a GPU.

    steps    the parts and the step table: each step's command, limits and skip condition; the two sizes
    parse    each step's outputs read back into figures
    figures  the targets and the figures checked against them
    summary  SUMMARY.md
    runner   a part: each step in its own process group under its limit; suite.json and the capped .tar.gz
    merge    the parts of one suite folder joined into its suite.json and SUMMARY.md
    probe    the environment step's own process: versions, matmul ceiling, copy bandwidth
    cli      the command line
"""
