"""Every model load and save in sdtool goes through this package; what differs per model family (SD1, SD2, …) is
in `families/`."""
