"""Hugging Face import and export: safetensors folders in, euro_lm checkpoints out, and back.

One module per architecture holds its mapping table and config translation (llama.py:
Llama; mistral.py, qwen2.py, qwen3.py, smollm3.py, gemma3.py build on it, ministral3.py on
mistral.py, apertus.py on qwen3.py, gemma.py and gemma2.py on gemma3.py); architectures.py
says which one reads an HF config or writes a euro_lm model; multimodal.py finds a
multimodal folder's language model (Gemma 3, Mistral 3). The rest knows no architecture:
safetensors.py (reading a folder, streaming shards), orbax_io.py (a checkpoint leaf by
leaf), tokenizer.py, folder.py (config.json and friends), and the drivers export.py and
import_.py.
"""

from euro_lm.errors import HFError
from euro_lm.hf.architectures import ARCHITECTURES, model_config_from_hf
from euro_lm.hf.export import DTYPES, export_hf
from euro_lm.hf.folder import CONFIG_FILE
from euro_lm.hf.import_ import import_hf, params_from_hf, training_overrides
from euro_lm.hf.llama import expected_hf_shapes, from_hf, hf_config, param_table, to_hf
from euro_lm.hf.orbax_io import CheckpointLeaves
from euro_lm.hf.safetensors import INDEX_FILE, SAFETENSORS_DTYPES, SafetensorsFolder, ShardWriter
from euro_lm.hf.tokenizer import write_tokenizer
