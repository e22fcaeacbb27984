"""The built-in model ``dit-digits``: its data split (``data``), its training (``training``) and the
quality metrics its table is measured with (``quality``)."""
