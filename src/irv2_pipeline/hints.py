"""Type hints that name Keras classes without importing Keras.

Kedro resolves the type hints of every node function when a run starts (to validate
typed parameters), and Kedro-Viz when it draws the pipelines. A hint that resolves to
``keras.Model`` would import Keras, and TensorFlow with it, in commands that never
touch a model. Type checkers see the Keras class; at run time the name stands for any
object.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keras import Model as KerasModel
else:
    KerasModel = object

__all__ = ["KerasModel"]
