"""The five pipelines of the DAG, one folder each."""
