"""Constants shared by the test files (imported as `helpers`: pytest puts tests/ on sys.path)."""

# The micro model of the training tests: one block of width 32 per tower, 16 px images. Training, resume
# and objective tests share it, so its programs have the same shapes wherever it runs.
MICRO_TOWERS = ("vision.image_size=16,vision.layers=1,vision.width=32,vision.heads=2,vision.mlp_dim=64,"
                "text.layers=1,text.width=32,text.heads=2,text.mlp_dim=64")
# As `model.overrides` of a CLIP ("tiny") and of a BLIP ("blip-tiny") run.
MICRO = f"{MICRO_TOWERS},projection_dim=32"
MICRO_BLIP = f"{MICRO_TOWERS},embed_dim=32"


def xla_flags(device_count: int | None = None) -> str:
  """The session's XLA_FLAGS (conftest.py: its compile-time options) for a process a test starts, with
  `device_count` simulated CPU devices instead of the session's eight (None: XLA's one)."""
  import os
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if device_count is not None:
    flags.append(f"--xla_force_host_platform_device_count={device_count}")
  return " ".join(flags)
