"""lcl-fast: Latent Compression Learning, the reference's mathematics, faster and leaner."""

__version__ = "0.1.0"
