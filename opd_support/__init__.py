"""
What opd.py needs that is not the method, one module each (imports run one way: rewards.py <-
these modules <- opd.py <- baselines.py, bench.py, sanity.py):

  config       the options: one dataclass, a line a field; the per-stage defaults table
  options      what each option accepts (a Rule per field) and the command-line parser
  runs         a training stage's life: checks before the model, the run folder's lock,
               start / resume, the loop's rounds with their validation, the optimizer step over
               ranks, the bookkeeping after it (EMA, log, checkpoints), graceful stop, finish
  checkpoints  the files of a run folder, written atomically and verified
  loras        LoRA files: saved in diffusers' format, read back as adapters
  evaluation   held-out metrics of every model of a run, eval.md, samples.png
  reports      curves and summaries over seeds, read from the run folders' JSON
  machinery    processes and collectives, named random streams, logging, the compute count, EMA,
               the guarded step
  prompts      the tasks: prompt sets, their draws, rewards
  sd3          the SD3 pipeline as the maths needs it: schedule, velocity with CFG, adapters
  tiny         the offline stand-in models (a tiny SD3 pretrained on toy images; SD3.5-M's
               transformer with random weights)
"""
