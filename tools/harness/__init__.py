"""The benchmark harness of tools/ (bench_accuracy.py, demo.py, bench_speed.py, fgfi_regions.py):
training runs with resume and per-run records (experiments), tables and charts (report).
Not part of the library users import (d2_taskdistill); scripts in tools/ import it as `harness`."""
