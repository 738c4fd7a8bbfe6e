"""Work beyond one process: the Spark session, where a batch runs (this process or Spark executors), and
a file of questions answered through `mlflow.pyfunc.spark_udf`."""
