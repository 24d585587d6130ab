"""The names under which runs are recorded in MLflow: the harness writes them, the sweeps and analysis read
them. One place, importable without torch (analysis never imports the rest of the harness)."""
from __future__ import annotations

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "cnn-zoo"

# --- tags ---
KIND = "cnn_zoo.kind"  # what a run is: one of the KIND_* values
KIND_TRAIN, KIND_RETRAIN, KIND_TRIAL, KIND_SWEEP = "train", "retrain", "trial", "sweep"
SEED_GROUP = "seed_group"  # runs of one --seeds command share it
FAILURE = "failure"  # why a run ended FAILED
STOP_REASON = "stop_reason"  # why a run stopped before its last epoch (e.g. "callback": an Optuna prune)
FORCED_RESUME = "forced_resume"  # what --force-resume let through
STUDY_NAME = "optuna.study_name"
TRIAL_NUMBER = "optuna.trial_number"
TRIAL_STATE = "optuna.state"
PARENT_RUN_ID = "mlflow.parentRunId"

# --- metrics logged once, at step 0, when a run ends (the run's latest value is the value) ---
PARAM_COUNT = "param_count"
FLOPS = "flops"
BEST_VAL_ACC = "best_val_acc"
BEST_EPOCH = "best_epoch"
TEST_ACC_AT_BEST_VAL = "test_acc_at_best_val"
FINAL_TEST_ACC = "final_test_acc"
FINAL_VAL_ACC = "final_val_acc"
TRAIN_SECONDS = "train_seconds"
SUMMARY_METRICS = (PARAM_COUNT, FLOPS, BEST_VAL_ACC, BEST_EPOCH, TEST_ACC_AT_BEST_VAL, FINAL_TEST_ACC, FINAL_VAL_ACC,
                   TRAIN_SECONDS)

# --- per-epoch metrics (step = epoch) ---
TRAIN_LOSS, TRAIN_ACC = "train_loss", "train_acc"
VAL_LOSS, VAL_ACC = "val_loss", "val_acc"
TEST_LOSS, TEST_ACC = "test_loss", "test_acc"
EPOCH_SECONDS = "epoch_seconds"
IMAGES_PER_SECOND = "images_per_second"

# --- params ---
RECIPE_HASH = "recipe_hash"
DATA_DIGEST = "data.digest"
MODEL_PARAM_PREFIX = "model."  # model.<hyperparameter>
ARCH, FAMILY, DATASET, RECIPE, SEED = "arch", "family", "dataset", "recipe", "seed"
EPOCHS, BATCH_SIZE, DEVICE = "epochs", "batch_size", "device"
TRAIN_SIZE, VAL_SIZE, TEST_SIZE = "data.train_size", "data.val_size", "data.test_size"
NUM_CLASSES = "data.num_classes"
RECIPE_PARAM_PREFIX = "recipe."  # recipe.<field>, the resolved recipe flattened (recipe.optimizer.lr, ...)

# --- timings and divergence ---
EVAL_SECONDS = "eval_seconds"  # evaluation only; runs that log it log TRAIN_SECONDS as training steps only
WALL_SECONDS = "wall_seconds"  # the whole run, start to end
DIVERGED = "cnn_zoo.diverged"  # tag: why a run that still finished was judged diverged
GIT_COMMIT, DEVICE_NAME = "git_commit", "device_name"  # provenance tags

# --- sweeps (a study's parent run and its trial runs) ---
REJECTED = "cnn_zoo.rejected"  # tag of a trial run never trained: why (over --max-params)
RETRY_OF = "optuna.retry_of"  # tag: the trial number whose parameters a retried trial trains again
BEST_TRIAL = "best_trial"  # tag of a parent run: its best trial's number
N_TRIALS = "n_trials"  # metric of a parent run: the trials that count
LR = "lr"  # per-epoch: the learning rate of the epoch's last update
COMMAND = "command"  # tag: the command line that started a run

# --- campaigns (sweeps/campaign.py): tags of each cell's train run ---
CAMPAIGN = "cnn_zoo.campaign"  # the campaign's name
CELL = "cnn_zoo.cell"  # the cell's key: ARCH_LABEL/DATASET/seedN
IMPORTED_FROM_RUN_ID = "imported_from_run_id"  # tag of a run imported from a file: the exported run's id

# --- run params: what the data loader did and why compile is on or off ---
DATA_PREPROCESS = "data.preprocess"  # the loader's preprocessing of the stored images ("none", MNIST's padding, ...)
COMPILE_RULE = "compile_rule"  # why param "compile" has its value: explicit, or the payback rule's numbers

# --- transfer (experiments/transfer.py): params of fine-tuning runs only ---
PRETRAINED = "pretrained"  # the weights file fine-tuned from (its name; timm:<hub id>/<file> for timm's own)
PRETRAINED_SHA256 = "pretrained.sha256"
SHOTS = "data.shots"  # K images per class drawn from the training split (--shots)
