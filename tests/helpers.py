"""Constants shared by the test files (imported as `helpers`: pytest puts tests/ on sys.path)."""

# The micro model of the training tests: one block of width 32 per tower, 16 px images. Training, resume
# and objective tests share it, so its programs have the same shapes wherever it runs.
MICRO_TOWERS = ("vision.image_size=16,vision.layers=1,vision.width=32,vision.heads=2,vision.mlp_dim=64,"
                "text.layers=1,text.width=32,text.heads=2,text.mlp_dim=64")
# As `model.overrides` of a CLIP ("tiny") and of a BLIP ("blip-tiny") run.
MICRO = f"{MICRO_TOWERS},projection_dim=32"
MICRO_BLIP = f"{MICRO_TOWERS},embed_dim=32"
