"""The test page of the web tracker: the page, the pinned official Plausible tracker
(vendor/), and the local origin that serves them (origin.py)."""
