"""The front ends this package ships: the command line and the gradio interface (the
standalone app and the A1111/Forge tab).  They translate, the engine does the work."""
