"""medxfer: which pretrained backbone transfers best to your medical images."""
__version__ = "0.1.0"

from medxfer.api import evaluate, extract_features, finetune, load_dataset, load_model, run  # noqa: E402
from medxfer.config import DatasetArg, RunSpec  # noqa: E402
from medxfer.models import register_model  # noqa: E402

__all__ = ["DatasetArg", "RunSpec", "evaluate", "extract_features", "finetune", "load_dataset",
           "load_model", "register_model", "run", "__version__"]
