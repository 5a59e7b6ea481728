"""What FiLM researchers do with a trained run: the paper's analyses of gamma and beta
(film_stats), accuracy by question and program length (steps), and figures (figures,
matplotlib imported only when a figure is drawn). The `analyze` and `plot` commands in
fastfilm/commands/ put them together."""
