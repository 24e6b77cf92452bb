"""Pipeline stages: plain functions ``run(cfg) -> result`` that know nothing about launching."""
