import os
import tempfile

# Compile tests must not read or pollute a user's inductor cache (node.meta is not part of
# inductor's cache key: a stale entry could hide a partitioner change).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="ckpt_compile_inductor_"))
