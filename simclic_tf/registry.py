"""Name -> class registries: a new backbone, perturbation, method or data source is
one class plus one `@REGISTRY.register("name")` line, and every consumer (config
validation, CLI choices, tuner search space) sees it."""


class Registry:
    """A named table of classes (or factories) with errors that list the choices."""

    def __init__(self, kind):
        self.kind = kind
        self._entries = {}

    def register(self, name):
        def decorator(obj):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name):
        if name not in self._entries:
            raise ValueError(
                f"Unknown {self.kind} {name!r}; accepted: {', '.join(self.names())}"
            )
        return self._entries[name]

    def names(self):
        return sorted(self._entries)

    def __contains__(self, name):
        return name in self._entries


BACKBONES = Registry("backbone")
PERTURBATIONS = Registry("perturbation")
PREDICTORS = Registry("predictor")
LOSSES = Registry("loss")
METHODS = Registry("method")
