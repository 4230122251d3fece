"""`python -m sdtool` runs the same app as the `sdtool` executable."""

from sdtool.cli import main

if __name__ == "__main__":
    main()
