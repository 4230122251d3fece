"""Speed benchmarks for sdtool: each module compares against a plain reference measured in the same run."""
