import os

# Everything is local: never reach the Hugging Face Hub (read by huggingface_hub at import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
