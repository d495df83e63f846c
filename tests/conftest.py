import os

# Eight host devices for the sharding tests; must be set before jax initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A small real-text corpus: the first 60 kB of three Shakespeare works."""
  from structattn.data import text as text_data
  d = tmp_path_factory.mktemp("corpus")
  for f in text_data.find_corpus("shakespeare")[:3]:
    (d / f.name).write_text(f.read_text(errors="replace")[:60_000])
  return d
