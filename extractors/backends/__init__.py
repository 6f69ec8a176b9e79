"""Alternative model implementations behind ``build_extractor(backend=...)``."""
