"""One denoiser adapter per host (see ``erase_engine.denoiser.Denoiser``): diffusers models
(standalone and tests), ComfyUI's MODEL, A1111's ldm/sgm model and Forge's.  The ComfyUI,
A1111 and Forge modules import their host's code and load only inside that host."""
