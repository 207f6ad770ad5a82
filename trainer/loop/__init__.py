"""The trainer service (`feedloop loop`): scheduled retraining on new feedback, gates, promotion."""
