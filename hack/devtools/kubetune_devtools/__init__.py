"""kubetune's test and demo tooling: tiny self-made models and datasets, and the pytest fixtures
of the real local cluster. A distribution of its own (``kubetune-devtools``), installed by
``make setup`` beside kubetune; the product's wheel and images carry none of it."""
