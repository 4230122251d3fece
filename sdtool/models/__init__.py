"""Every model load and save in sdtool goes through this package."""
