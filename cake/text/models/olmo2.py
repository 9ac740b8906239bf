"""OLMo 2: RMSNorms after attention and after the MLP (none before), and q/k RMSNorm over the
whole projection rather than per head."""
from cake.text.models.decoder import Model  # noqa: F401


def configure(cfg: dict, fields: dict) -> None:
    fields.update(norms="post", qk_norm="proj")
