"""Commands run as `python -m lkca_jax.tools.NAME`; nothing in the library imports them."""
