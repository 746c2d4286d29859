"""What operators run beside the stages: the multi-company and internal-user report, the queue's
stats, dead letters and purges (`queue`, `queue_db`), progress on the terminal, and `relay try`
(`try_rules`).
"""
