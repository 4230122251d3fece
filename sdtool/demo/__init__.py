"""`sdtool demo` (CONTRACT §M): the whole workflow offline on generated data (`data`) and a tiny model (`run`)."""
