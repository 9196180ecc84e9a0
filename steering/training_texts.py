"""Built-in texts for training vectors from examples (steering/training.py): plain data, no code.

* `NEUTRAL_TEXTS`: the contrast set when a training request gives positives only. Ordinary,
  topic-light sentences from many registers (errands, weather, instructions, small talk), so that
  what a positive set shares beyond "being an English sentence" is what the difference keeps.
* `PERSONA_TEMPLATES` x `CONTINUATIONS`: two words ("happy", "sad") become paired examples, as
  repeng's `make_dataset` does (a persona instruction followed by the start of a neutral reply):
  each pair differs only in the word, so the difference is the word's effect on the reply.
"""

from __future__ import annotations

NEUTRAL_TEXTS = (
    "The meeting has been moved to Thursday afternoon.",
    "Please remember to bring your ticket to the front desk.",
    "It rained for most of the morning, then the sky cleared.",
    "The report is due at the end of the month.",
    "She put the keys on the table next to the door.",
    "Turn left at the second light and park behind the building.",
    "The train leaves at a quarter past eight.",
    "He read the instructions twice before starting.",
    "There are three chairs in the room and one small window.",
    "We need to buy milk, bread and a few apples.",
    "The package should arrive sometime next week.",
    "I will call you back after lunch.",
    "The office is closed on public holidays.",
    "Add the numbers in the first column and write the total below.",
    "The bus was a few minutes late today.",
    "Could you send me the file when you have a moment?",
    "The store opens at nine and closes at six.",
    "They painted the fence white last summer.",
    "The form asks for your name, address and phone number.",
    "It is usually quiet here in the early evening.",
    "The printer on the second floor is out of paper.",
    "He walked to the corner and waited for the light to change.",
    "The next update will be released in a few days.",
    "Put the box on the bottom shelf, please.",
    "The temperature will stay about the same tomorrow.",
    "Most of the tickets were sold before noon.",
    "The room on the left is used for storage.",
    "She wrote the date at the top of the page.",
    "We talked for a while and then went home.",
    "The list has twelve items on it.",
    "Check that the lid is closed before you start the machine.",
    "The new schedule starts on Monday.",
    "A small table stood in the corner of the hall.",
    "I think the answer is on the next page.",
    "The road is being repaired, so expect some delays.",
    "He finished the task and moved on to the next one.",
    "There is a parking lot behind the library.",
    "The class begins at ten and lasts an hour.",
    "Let me know if anything changes.",
    "The light in the hallway stays on all night.",
)

# "{}" is the word. Short instructions, as repeng's ("Act as if you're extremely {persona}.").
PERSONA_TEMPLATES = (
    "Act as if you are extremely {}.",
    "You are a very {} person.",
    "Pretend to be {}.",
    "Write as someone who feels {}.",
)

# The start of a reply that says nothing by itself: what the persona colours.
CONTINUATIONS = (
    "I think",
    "Today I",
    "The thing is,",
    "When I woke up this morning,",
    "Let me tell you about",
    "Honestly,",
    "My friend asked me",
    "Yesterday we went",
    "The weather",
    "I looked at the",
    "Well, you know,",
    "At work,",
    "So here is what happened:",
    "I want to",
    "The best part of",
    "Sometimes I",
)
