"""A converted model's card, and its upload to the Hugging Face Hub."""

from pathlib import Path
from typing import Optional


def model_card(name: str, base_model: Optional[str], license: Optional[str]) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        library_name="mlx",
        pipeline_tag="text-generation",
        tags=["mlx", "diffusiongemma"],
        base_model=base_model,
        license=license,
    )
    source = f" from [{base_model}](https://huggingface.co/{base_model})" if base_model else ""
    return f"""---
{data.to_yaml()}
---

# {name}

DiffusionGemma converted to MLX{source} with mlx-diffgemma's
`python -m mlx_diffgemma.convert`. It runs with mlx-diffgemma, not mlx-lm: the
model generates by block diffusion.

```python
from mlx_diffgemma import load
from mlx_diffgemma.generate import generate

model, tokenizer = load("{name}")
print(generate(model, tokenizer, "Write a haiku about the sea."))
```
"""


def source_license(model_path: Path) -> Optional[str]:
    readme = model_path / "README.md"
    if not readme.exists():
        return None
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(readme).data.license
    except Exception:  # a card without metadata is no reason to fail
        return None


def upload_to_hub(path: Path, upload_repo: str):
    """Upload a converted model, its card naming the repo it is uploaded to."""
    from huggingface_hub import HfApi, ModelCard

    card = ModelCard.load(path / "README.md")
    text = model_card(upload_repo, card.data.base_model, card.data.license)
    (path / "README.md").write_text(text)
    api = HfApi()
    api.create_repo(repo_id=upload_repo, exist_ok=True)
    # upload_large_folder (resumable) is gone from huggingface_hub 2.x.
    upload = getattr(api, "upload_large_folder", None) or api.upload_folder
    upload(folder_path=str(path), repo_id=upload_repo, repo_type="model")
    print(f"[INFO] Uploaded to https://huggingface.co/{upload_repo}")
