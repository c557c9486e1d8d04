"""Switches that make other libraries' models use the xmsda op."""
