"""keras-tuner ablations of SimCLIC: the paper's Tables 4 to 6 (predictor,
stop-gradient, loss), the perturbation type and its strength, as resumable
searches that write a results table. Run `simclic tune --help`.

- `tuning.hypermodel`: the search space derived from SimCLICConfig, the
  HyperModel, the validation split and the objective callback;
- `tuning.search`: the tuner, the oracle that resumes a grid, and the CLI;
- `tuning.table`: the results tables.
"""
