"""``make bench``: speed, agreement and memory figures against their goals (``bench.py``)."""
