"""Freezing policy: which parts of AnyMAL train (`set_trainable`), and frozen encoders kept in eval mode."""


class AnyMALFreezingMixin:
    """Training set-up by part: the language model, each modality's encoder and each projector."""

    def train(self, mode: bool = True):
        """As `nn.Module.train`, except that an encoder with no trainable parameter stays in eval mode: frozen means
        frozen, with no BatchNorm statistics updates (CLAP's) and no dropout. Unfreeze it (`set_trainable`) to train it.
        """
        super().train(mode)
        for encoder in self.base_model.encoders.values():
            if not any(parameter.requires_grad for parameter in encoder.parameters()):
                encoder.eval()  # a frozen encoder stays frozen: no BatchNorm statistics updates, no dropout
        return self

    def set_trainable(
        self,
        language_model: bool = False,
        encoders: bool | list[str] = False,
        projectors: bool | list[str] = True,
    ) -> dict[str, int]:
        """Freezes or unfreezes the model by part and returns the trainable parameter count of each part.

        `encoders` and `projectors` take `True`/`False` for all of them or a list of modality names. The defaults
        are the paper's alignment stage: only the projectors train.
        """
        base = self.base_model
        parts = {"language_model": ([base.language_model, getattr(self, "lm_head", None)], language_model)}
        for kind, chosen, modules in (("encoders", encoders, base.encoders), ("projectors", projectors, base.projectors)):
            if not isinstance(chosen, bool) and (unknown := set(chosen) - set(base.config.modalities)):
                raise ValueError(f"set_trainable({kind}=...): no modality {sorted(unknown)} in {base.config.modalities}.")
            for name, module in modules.items():  # a shared encoder (video's) trains if any of its modalities does
                users = [n for n in base.config.modalities if (kind == "projectors" and n == name)
                         or (kind == "encoders" and base.modality_encoder(n) is module)]
                parts[f"{kind}.{name}"] = ([module], chosen if isinstance(chosen, bool) else bool(set(users) & set(chosen)))
        for modules, trainable in parts.values():
            for module in filter(None, modules):
                module.requires_grad_(trainable)
        return {
            part: sum(p.numel() for m in filter(None, modules) for p in m.parameters() if p.requires_grad)
            for part, (modules, _) in parts.items()
        }
