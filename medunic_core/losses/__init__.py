"""Med-UniC losses: L = w_cvl L_CVL + w_ssv L_SSV + w_ctr (L_TF + L_TT)."""

from __future__ import annotations

import torch

from medunic_core.config import LossConfig
from medunic_core.errors import DivergenceError
from medunic_core.losses.contrastive import infonce
from medunic_core.losses.ctr import tf_loss, tf_loss_from_c, tt_loss

__all__ = ["infonce", "tf_loss", "tf_loss_from_c", "tt_loss", "medunic_loss", "check_finite_loss"]


def medunic_loss(out: dict[str, torch.Tensor], cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Named loss parts from the model's embeddings, plus their weighted sum ``loss``.

    Every part is returned (also with weight 0) so that logs always show the same keys,
    except L_SSV when its weight is 0 and the model was given no strong view (training
    then skips that view's encoding, about half the image encoder's work).
    A federated site in ``align.train_norm=mixed`` puts the mixed cross-correlation in
    ``out["ctr_c"]``; L_TF then uses it instead of the batch's own C.
    """
    parts = {"cvl_loss": infonce(out["image"], out["text"], cfg.temperature)}
    total = cfg.cvl_weight * parts["cvl_loss"]
    if "image_strong" in out:
        parts["ssv_loss"] = infonce(out["image"], out["image_strong"], cfg.temperature)
        total = total + cfg.ssv_weight * parts["ssv_loss"]
    elif cfg.ssv_weight:
        raise ValueError(f"loss.ssv_weight={cfg.ssv_weight:g} needs the strong image view; the batch has none")
    if cfg.ctr:
        if "ctr_c" in out:
            parts["tf_loss"] = tf_loss_from_c(out["ctr_c"], cfg.ctr_lambda, cfg.tf_denom)
        else:
            parts["tf_loss"] = tf_loss(out["ctr_a"], out["ctr_b"], cfg.ctr_lambda, cfg.tf_denom)
        ctr = parts["tf_loss"]
        if cfg.use_tt:
            parts["tt_loss"] = tt_loss(out["ctr_a"], out["ctr_b"], cfg.ctr_lambda, cfg.tt_denom)
            ctr = ctr + parts["tt_loss"]
        parts["ctr_loss"] = ctr
        total = total + cfg.ctr_weight * ctr
    parts["loss"] = total
    return parts


def check_finite_loss(parts: dict[str, torch.Tensor], where: str) -> None:
    """Stop training at the first non-finite loss, before it reaches the weights or a
    checkpoint: raises DivergenceError naming ``where`` and every part's value."""
    if bool(torch.isfinite(parts["loss"].detach()).all()):
        return
    values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in parts.items())
    raise DivergenceError(f"{where}: the loss is not finite ({values}); training stopped and nothing was saved "
                          "after the last checkpoint. Lower the learning rate or check the loss settings")
