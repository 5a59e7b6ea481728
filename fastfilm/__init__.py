"""fastfilm: fast, verified FiLM visual reasoning on CLEVR-style data."""
__version__ = "0.1.0"
