"""dkd: large-scale knowledge distillation with a class-sharded, importance-sampled head."""
import os as _os
import sys as _sys

__version__ = "0.1.0"

# DeepSpeed builds its CPU ops into torch's extension cache, by default ~/.cache, shared by
# every virtualenv of the user: two installs then rebuild it in turn and every start waits
# for the build. Keep it per environment unless the user chose a place.
_os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                       _os.path.join(_sys.prefix, "var", "torch_extensions"))
