"""`vlmd demo` and the demo model's world, in one place.

- command.py: the command (an embedded broker and a daemon on their defaults, drawn scenes
  published as frames, a caption, questions, typed answers, a conversation and a watch,
  each answer printed beside the truth);
- scenes.py: the synthetic scenes the demo model was trained on (shapes, colours, places)
  and their captions;
- questions.py: the questions people type about them, in their phrasings, and the right
  answer for a scene (the truth checks).

Used by the command, tools/ (training and evaluating the demo model) and tests; never by
the service.
"""

from daemon.commands.demo.command import HELP, add_arguments, run

__all__ = ["HELP", "add_arguments", "run"]
