import os
import sys
from pathlib import Path

# The reference model and helpers beside the tests are imported as plain modules.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_SILENT", "true")
