"""What operators run beside the stages: the multi-company and internal-user report, the queue's
stats, dead letters, their replay and purges (`queue`, `queue_db`, `replay`), progress on the
terminal, `relay try` (`try_rules`), the recovery of a damaged database (`salvage`) and the files
of several workers (`worker_files`).
"""
