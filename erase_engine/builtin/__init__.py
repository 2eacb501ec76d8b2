"""The built-in demo model (``builtin:shapes``): a small text-to-image diffusion model
trained on rendered shapes, and the judge that measures what an erasure did."""
