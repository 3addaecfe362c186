"""First-stage models of the offline default: CLIP scorer, autoencoder, text encoder (build, train, save, load).

Import the submodules (`ldm.first_stage.clip`, `.autoencoder`, `.text_encoder`, `.bootstrap`) directly;
this package stays import-light so that loading one model does not import the others' libraries.
"""
