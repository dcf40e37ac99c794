"""The structured everyday domain: a grammar of voice commands, numbers, dates and phone menus.

Each sentence comes from a template (its intent) whose top-level slots are filled recursively, so the generator knows,
for every sentence it speaks, what was asked and with which values: transcription and understanding tasks
(`speechlm.demo.understanding`) are rendered from the same clips. Held-out sentences are a property of the string.
"""

from __future__ import annotations

import functools
import random
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from .text import number_to_words, ordinal_words


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",")]


def _numbers(lo: int, hi: int) -> list[str]:
    return [number_to_words(i) for i in range(lo, hi + 1)]


# Slots expand recursively; `{name}` in a filler refers to another slot. Every filler is already normalised text.
SLOTS: dict[str, list[str]] = {
    "digit": _numbers(0, 9),
    "digits3": ["{digit} {digit} {digit}"],
    "digits4": ["{digit} {digit} {digit} {digit}"],
    "digits5": ["{digit} {digit} {digit} {digit} {digit}"],
    "digits6": ["{digit} {digit} {digit} {digit} {digit} {digit}"],
    "digits8": ["{digits4} {digits4}"],
    "phone": ["{digits3} {digits4}", "{digits3} {digits3} {digits4}"],
    "count": _numbers(2, 12),
    "small": _numbers(1, 59),
    "ten": _numbers(1, 10),
    "money": _numbers(1, 999),
    "cents": _numbers(1, 99),
    "temp": _numbers(0, 105),
    "percent": [number_to_words(i) for i in range(10, 101, 5)],
    "hour": _numbers(1, 12),
    "minute": ["o'clock", "oh five", "ten", "fifteen", "twenty", "twenty five", "thirty", "thirty five", "forty",
               "forty five", "fifty", "fifty five", "oh two", "seventeen", "forty two"],
    "part_of_day": _words("in the morning, in the afternoon, in the evening, at night"),
    "time": ["{hour} {minute}", "{hour} {minute}", "{hour} {minute} {part_of_day}", "half past {hour}",
             "quarter past {hour}", "quarter to {hour}", "noon", "midnight", "{hour} {part_of_day}"],
    "weekday": _words("monday, tuesday, wednesday, thursday, friday, saturday, sunday"),
    "month": _words("january, february, march, april, may, june, july, august, september, october, november, "
                    "december"),
    "ordinal": [ordinal_words(i) for i in range(1, 32)],
    "date": ["on the {ordinal} of {month}", "on {month} {ordinal}", "on {weekday}", "on {weekday} the {ordinal}",
             "tomorrow", "today", "next {weekday}", "this {weekday}", "the day after tomorrow", "next week",
             "on the {ordinal}"],
    "when": ["{date}", "{date}", "tonight", "this evening", "tomorrow morning", "in {small} minutes", "in an hour",
             "at {time}", "{date} at {time}", "this weekend"],
    "when_day": _words("today, tomorrow, tonight, this weekend, this afternoon, next week, {date}, on {weekday}"),
    "duration": ["{small} minutes", "{count} hours", "an hour and a half", "{small} seconds", "half an hour",
                 "{count} hours and {small} minutes", "one hour"],
    "person": _words("alice, bob, carlos, diana, emma, frank, grace, henry, isabel, jack, karen, liam, maria, noah, "
                     "olivia, peter, rachel, sam, sophia, tom, zoe, james, sarah, david, laura, kevin, nina, ryan, "
                     "ahmed, priya, chen, mateo, hannah, lucas"),
    "surname": _words("smith, johnson, garcia, brown, miller, davis, wilson, lopez, taylor, anderson, thomas, moore, "
                      "martin, lee, walker, young, king, wright, scott, patel, nguyen, kim"),
    "relation": _words("mom, dad, grandma, grandpa, my sister, my brother, my wife, my husband, my boss, the doctor, "
                       "the dentist, the office, my neighbor, the babysitter") + ["aunt {person}", "uncle {person}"],
    "contact": ["{person}", "{relation}", "{person} {surname}", "{relation}"],
    "city": _words("london, paris, new york, boston, chicago, seattle, denver, dallas, houston, miami, atlanta, "
                   "phoenix, toronto, vancouver, montreal, berlin, madrid, rome, lisbon, dublin, amsterdam, vienna, "
                   "tokyo, seoul, sydney, cairo, nairobi, mumbai, singapore, mexico city, san francisco, los angeles, "
                   "las vegas, washington, portland, oslo, athens"),
    "poi": _words("gas station, pharmacy, supermarket, coffee shop, train station, airport, hospital, post office, "
                  "bank, library, gym, park, bakery, hotel, restaurant, parking lot, bus stop, school, museum"),
    "street": _words("oak, maple, pine, cedar, elm, main, park, lake, hill, river, church, market, spring, sunset, "
                     "lincoln"),
    "street_type": _words("street, avenue, road, drive, lane, boulevard, court"),
    "address": ["{money} {street} {street_type}", "{digits3} {street} {street_type}"],
    "cuisine": _words("italian, chinese, mexican, indian, thai, japanese, greek, french, korean, vegetarian"),
    "room": _words("kitchen, living room, bedroom, bathroom, garage, office, hallway, dining room, basement, "
                   "kids room"),
    "device": _words("lights, lamp, fan, heater, air conditioner, tv, radio, speaker"),
    "appliance": _words("dishwasher, washing machine, dryer, oven, coffee maker, vacuum"),
    "onoff": ["on", "off"],
    "updown": ["up", "down"],
    "door": _words("front door, back door, garage door, side gate"),
    "covering": _words("blinds, curtains, windows"),
    "color": _words("red, blue, green, warm white, yellow, purple, orange, pink"),
    "genre": _words("jazz, rock, classical music, country, hip hop, blues, reggae, pop, folk, soul, the news, "
                    "a podcast, relaxing music, something upbeat"),
    "playlist": _words("workout, dinner, morning, road trip, sleep, focus"),
    "item": _words("milk, eggs, bread, butter, coffee, bananas, apples, rice, pasta, cheese, chicken, tomatoes, "
                   "onions, orange juice, cereal, yogurt, paper towels, dog food, toothpaste, batteries, olive oil, "
                   "potatoes, carrots, soap"),
    "bill": _words("electric, water, phone, internet, gas, credit card"),
    "task": ["buy {item}", "call {contact}", "pay the {bill} bill", "water the plants", "take out the trash",
             "pick up the kids", "feed the cat", "walk the dog", "book a haircut", "return the library books",
             "send the report", "take my medicine", "renew my passport", "charge my phone", "check the mail",
             "pick up {item}"],
    "message": ["i am running late", "i will be there in {small} minutes", "see you at {time}", "call me back",
                "dinner is ready", "i am on my way", "happy birthday", "the meeting moved to {time}",
                "can you pick up {item}", "i am at the {poi}"],
    "event": ["dentist appointment", "team meeting", "doctor appointment", "lunch with {person}", "yoga class",
              "haircut", "birthday party", "dinner with {contact}"],
    "phone_kind": _words("mobile, cell phone, home phone, work phone, speaker"),
    "wadj": _words("sunny, cloudy, rainy, windy, foggy, cold, hot, warm, snowy, stormy, humid, clear"),
    "airline": _words("united, delta, american, lufthansa, emirates, qantas, southwest, air france, air canada, "
                      "alaska"),
    "flight": ["{digit} {digit} {digit}", "{digit} {digit} {digit} {digit}", "{count}"],
    "letter": _words("b, c, d, e, f, g, h, j, k, m, p, r, s, t, x, z"),
    "gate": ["{letter} {small}"],
    "dept": _words("sales, billing, support, technical support, customer service, accounts, reservations, returns, "
                   "new orders, the pharmacy, appointments, our hours and location, lost or stolen cards"),
    "agent": _words("an agent, a representative, the operator, a nurse, a pharmacist, customer service"),
    "acct": _words("account number, pin, password, phone number, member number, zip code, extension, "
                   "date of birth, order number, card number, confirmation code, mailbox number"),
    "company": ["{surname} and sons", "city bank", "the dental office", "{surname} insurance", "{city} airlines",
                "the {surname} clinic", "{street} street pharmacy"],
    "action": _words("repeat this message, hear the next message, delete this message, save this message, "
                     "change your password, record your name, speak to an operator, return to the main menu, "
                     "confirm your appointment, cancel your appointment, check your balance, make a payment, "
                     "hear our hours, leave a message"),
    "amount": ["{money} dollars", "{money} dollars and {cents} cents", "{cents} cents"],
}

# Top-level templates by category; a category is drawn first so that every kind of sentence is well represented.
TEMPLATES: dict[str, list[str]] = {
    "alarms": ["set an alarm for {time}", "set an alarm for {time} {date}", "wake me up at {time}",
               "wake me up at {time} {date}", "set a timer for {duration}", "cancel my {time} alarm",
               "snooze for {small} minutes", "turn off all alarms", "what time is my alarm set for",
               "move my alarm to {time}", "set a {duration} timer"],
    "calls": ["call {contact}", "call {contact} on {phone_kind}", "phone {contact}", "dial {phone}",
              "text {contact} that {message}", "send a message to {contact} saying {message}",
              "read my messages from {contact}", "video call {contact}", "redial the last number",
              "call the nearest {poi}", "tell {contact} {message}"],
    "reminders": ["remind me to {task} {when}", "remind me {when} to {task}", "add {item} to my shopping list",
                  "add {item} and {item} to the list", "what is on my calendar {date}",
                  "schedule a meeting with {contact} {date} at {time}", "cancel my appointment with {contact}",
                  "move my {event} to {date}", "create an event called {event} {date}", "remind me to {task}"],
    "home": ["turn {onoff} the {room} {device}", "turn the {room} {device} {onoff}",
             "switch {onoff} the {device} in the {room}", "set the thermostat to {temp} degrees",
             "set the {room} temperature to {temp} degrees", "dim the {room} lights to {percent} percent",
             "lock the {door}", "unlock the {door}", "is the {door} locked", "open the {covering} in the {room}",
             "close the {covering} in the {room}", "start the {appliance}", "turn the {room} lights {color}",
             "turn {onoff} the {appliance}"],
    "music": ["play some {genre}", "play {genre} in the {room}", "play {genre} on the {room} speaker",
              "skip this song", "play the next song", "turn the volume {updown}", "set the volume to {ten}",
              "pause the music", "resume playback", "shuffle my {playlist} playlist", "what song is this",
              "turn it {updown} a little", "play my {playlist} playlist in the {room}"],
    "numbers": ["my pin is {digits4}", "the code is {digits6}", "my account number is {digits8}",
                "my phone number is {phone}", "my zip code is {digits5}",
                "the confirmation code is {letter} {letter} {digit} {digit} {digit}", "the total comes to {amount}",
                "transfer {amount} to {contact}", "pay {contact} {amount}", "that will be {amount} please",
                "i need {count} tickets", "table for {count} please", "my room number is {digits3}",
                "extension {digits4}", "what is {small} plus {small}", "what is {count} times {count}",
                "the number is {phone}"],
    "dates": ["book a table for {count} {date} at {time}", "my appointment is {date} at {time}",
              "the meeting is {date}", "my birthday is on the {ordinal} of {month}",
              "we leave on {month} {ordinal} and come back on the {ordinal} of {month}",
              "the package will arrive {date}", "the rent is due on the {ordinal}",
              "what day is the {ordinal} of {month}", "the deadline is {date} at {time}",
              "pay the {bill} bill {date}", "is the store open {date}"],
    "places": ["navigate to the {poi}", "take me to {address}", "directions to the nearest {poi}",
               "how far is {city} from {city}", "how long will it take to get to {city}",
               "find a {cuisine} restaurant near me", "where is the closest {poi}", "my name is {person} {surname}",
               "this is {person} {surname} calling from {city}", "i live at {address}",
               "share my location with {contact}", "avoid highways on the way to the {poi}",
               "meet me at the {poi} on {street} {street_type}"],
    "weather": ["what is the weather {when_day}", "what is the weather in {city} {when_day}",
                "will it rain in {city} {when_day}", "do i need an umbrella {when_day}",
                "how cold will it be {when_day}", "what is the temperature in {city}",
                "it will be {wadj} in {city} {when_day} with a high of {temp} degrees",
                "expect {wadj} skies {when_day} with a low of {temp}", "is it going to snow {when_day}",
                "there is a {percent} percent chance of rain {when_day}",
                "the wind is blowing at {small} miles per hour", "it is {temp} degrees and {wadj} in {city}"],
    "flights": ["book a flight from {city} to {city} {date}", "find me a flight to {city} {date}",
                "is flight {flight} on time", "when does my flight to {city} leave",
                "{airline} flight {flight} to {city} departs at {time} from gate {gate}",
                "{airline} flight {flight} from {city} has landed",
                "flight {flight} to {city} is delayed by {small} minutes", "check me in for my flight to {city}",
                "i need a window seat on the flight to {city}", "the boarding gate has changed to gate {gate}",
                "cancel my flight to {city}", "what terminal does {airline} use",
                "this is the final boarding call for {airline} flight {flight} to {city}"],
    "phone_menu": ["press {digit} for {dept}", "for {dept} press {digit}",
                   "for {dept} press {digit} for {dept} press {digit}", "to speak with {agent} press {digit}",
                   "please enter your {acct} followed by the pound key",
                   "please enter your {acct} and then press pound",
                   "please say or enter your {acct}", "please hold while we transfer your call",
                   "please hold while i connect your call to {dept}",
                   "your call is important to us please stay on the line", "to repeat these options press star",
                   "to return to the main menu press star", "you have {count} new messages",
                   "you have {count} new messages and {count} saved messages",
                   "the number you have dialed is not in service", "please leave a message after the tone",
                   "thank you for calling {company}", "thank you for calling {company} your call may be recorded",
                   "the estimated wait time is {small} minutes", "you are caller number {count} in the queue",
                   "that is not a valid {acct} please try again", "press {digit} to {action}",
                   "to {action} press {digit}", "your balance is {amount}",
                   "your next payment of {amount} is due {date}", "please enter the {acct} you wish to change"],
}

_SLOT = re.compile(r"\{(\w+)\}")


def _expand(template: str, rng: random.Random) -> str:
    text = _SLOT.sub(lambda m: _expand(rng.choice(SLOTS[m.group(1)]), rng), template)
    return " ".join(text.split())


def vocabulary() -> set[str]:
    """Every word the grammar can produce (exact, from the templates and slot fillers, not from samples)."""
    texts = [t for templates in TEMPLATES.values() for t in templates] + [f for v in SLOTS.values() for f in v]
    return {w for t in texts for w in _SLOT.sub(" ", t).split()}


# ----------------------------------------------------------------------------------------------- what was asked
@dataclass(frozen=True)
class Utterance:
    """A sentence with its meaning: the template's intent and the values of its top-level slots, in order."""

    text: str
    intent: str
    slots: tuple[tuple[str, str], ...]


_STOP_WORDS = frozenset("a an the to for my me at of on in is it and that with this all what some from by be will "
                        "your you please i there do does how when where which".split())
# Intent names read off the templates (first two content words), except where that reads badly or where two
# phrasings ask for the same thing.
_INTENT_NAMES = {
    "add {item} and {item} to the list": "add_to_list", "add {item} to my shopping list": "add_to_list",
    "you are caller number {count} in the queue": "queue_position", "what is on my calendar {date}": "check_calendar",
    "your call is important to us please stay on the line": "hold_message",
    "please hold while we transfer your call": "hold_transfer",
    "please hold while i connect your call to {dept}": "hold_transfer",
    "this is {person} {surname} calling from {city}": "caller_identity", "where is the closest {poi}": "find_place",
    "directions to the nearest {poi}": "navigate", "navigate to the {poi}": "navigate",
    "take me to {address}": "navigate", "how cold will it be {when_day}": "ask_cold",
    "what day is the {ordinal} of {month}": "day_of_date",
    "it is {temp} degrees and {wadj} in {city}": "weather_report",
    "it will be {wadj} in {city} {when_day} with a high of {temp} degrees": "weather_forecast",
    "expect {wadj} skies {when_day} with a low of {temp}": "weather_forecast",
    "there is a {percent} percent chance of rain {when_day}": "rain_chance",
    "the wind is blowing at {small} miles per hour": "wind_report",
    "please enter your {acct} followed by the pound key": "enter_field",
    "please enter your {acct} and then press pound": "enter_field", "please say or enter your {acct}": "enter_field",
    "please enter the {acct} you wish to change": "change_field", "that is not a valid {acct} please try again":
    "invalid_entry", "the estimated wait time is {small} minutes": "wait_time", "how far is {city} from {city}":
    "distance", "how long will it take to get to {city}": "travel_time",
    "this is the final boarding call for {airline} flight {flight} to {city}": "boarding_call",
    "{airline} flight {flight} from {city} has landed": "flight_landed", "is flight {flight} on time": "flight_status",
    "when does my flight to {city} leave": "flight_departure", "check me in for my flight to {city}": "flight_check_in",
    "you have {count} new messages": "new_messages", "you have {count} new messages and {count} saved messages":
    "new_messages", "i live at {address}": "home_address", "is the {door} locked": "lock_status",
    "meet me at the {poi} on {street} {street_type}": "meeting_place", "the meeting is {date}": "meeting_date",
    "move my {event} to {date}": "move_event", "my name is {person} {surname}": "introduce",
    "i need {count} tickets": "buy_tickets", "i need a window seat on the flight to {city}": "window_seat",
    "the number is {phone}": "phone_number", "my phone number is {phone}": "phone_number",
    "the number you have dialed is not in service": "not_in_service", "that will be {amount} please": "amount_due",
    "the total comes to {amount}": "amount_due", "open the {covering} in the {room}": "open_covering",
    "close the {covering} in the {room}": "close_covering", "the package will arrive {date}": "delivery_date",
    "what is {small} plus {small}": "add_numbers", "what is {count} times {count}": "multiply_numbers",
    "for {dept} press {digit} for {dept} press {digit}": "press",
    "to repeat these options press star": "repeat_options", "to return to the main menu press star": "main_menu",
    "what song is this": "identify_song", "to speak with {agent} press {digit}": "press_for_agent",
    "start the {appliance}": "start_appliance", "switch {onoff} the {device} in the {room}": "turn",
    "table for {count} please": "book_table", "tell {contact} {message}": "send_message",
    "text {contact} that {message}": "send_message", "what is the temperature in {city}": "ask_temperature",
    "what terminal does {airline} use": "airline_terminal", "thank you for calling {company}": "greeting",
    "thank you for calling {company} your call may be recorded": "greeting",
    "what time is my alarm set for": "check_alarm", "turn it {updown} a little": "turn_volume",
    "turn off all alarms": "turn_off_alarms", "turn the {room} lights {color}": "light_color",
    "we leave on {month} {ordinal} and come back on the {ordinal} of {month}": "trip_dates",
    "snooze for {small} minutes": "snooze", "redial the last number": "redial", "is the store open {date}":
    "opening_hours", "the rent is due on the {ordinal}": "due_date", "the code is {digits6}": "code",
    "will it rain in {city} {when_day}": "rain", "is it going to snow {when_day}": "snow",
    "do i need an umbrella {when_day}": "rain", "play the next song": "skip_song", "skip this song": "skip_song",
}
# Slot names are the grammar's; a few get the name a user would give the value.
_SLOT_KEYS = {"small": "number", "ten": "level", "wadj": "condition", "acct": "field", "dept": "department",
              "poi": "place", "when_day": "when", "onoff": "state", "updown": "direction", "digits3": "number",
              "digits4": "number", "digits5": "number", "digits6": "code", "digits8": "number", "temp": "temperature",
              "phone_kind": "phone_type", "genre": "music"}


def intent_of(template: str) -> str:
    """The intent a template expresses (a stable snake_case name)."""
    if template in _INTENT_NAMES:
        return _INTENT_NAMES[template]
    words = [w for w in _SLOT.sub(" ", template).split() if w not in _STOP_WORDS]
    return "_".join(words[:2])


def template_slots(template: str) -> list[tuple[str, str]]:
    """(JSON key, slot name) of a template's top-level slots in spoken order (a repeated key gets `_2`, `_3`, ...)."""
    slots, counts = [], {}
    for match in _SLOT.finditer(template):
        key = _SLOT_KEYS.get(match.group(1), match.group(1))
        counts[key] = counts.get(key, 0) + 1
        slots.append((key if counts[key] == 1 else f"{key}_{counts[key]}", match.group(1)))
    return slots


@functools.cache
def slot_pattern(name: str) -> str:
    """A regular expression matching exactly the values slot `name` can take (its fillers expanded recursively)."""
    return _alternatives(SLOTS[name])


@functools.cache
def sentence_pattern() -> str:
    """A regular expression matching exactly the sentences the grammar can say (~460 kB): what a command application
    knows it can be asked, for holding a transcript to it."""
    return _alternatives([template for templates in TEMPLATES.values() for template in templates])


def _alternatives(texts: Sequence[str]) -> str:
    """Texts with `{slot}` references as one regular expression, each slot expanded to what it can say."""
    alternatives = []
    for text in texts:
        pieces, last = [], 0
        for match in _SLOT.finditer(text):
            pieces += [_literal(text[last : match.start()]), f"(?:{slot_pattern(match.group(1))})"]
            last = match.end()
        alternatives.append("".join([*pieces, _literal(text[last:])]))
    return "|".join(dict.fromkeys(alternatives))


def _literal(text: str) -> str:
    return re.sub(r"([.^$*+?()\[\]{}|\\])", r"\\\1", text)


def expand_template(template: str, rng: random.Random) -> Utterance:
    """Fill `template` as `_expand` would (same draws, same text) and keep each top-level slot's value."""
    pieces, slots, last = [], [], 0
    for match, (key, _) in zip(_SLOT.finditer(template), template_slots(template), strict=True):
        value = _expand(rng.choice(SLOTS[match.group(1)]), rng)
        slots.append((key, value))
        pieces += [template[last : match.start()], value]
        last = match.end()
    text = " ".join("".join([*pieces, template[last:]]).split())
    return Utterance(text, intent_of(template), tuple(slots))


def _utterance_stream(seed: int) -> Iterator[Utterance]:
    rng = random.Random(seed)
    categories = sorted(TEMPLATES)
    while True:
        yield expand_template(rng.choice(TEMPLATES[rng.choice(categories)]), rng)


def intent_shares() -> dict[str, float]:
    """Each intent's share of `_utterance_stream`'s draws (a category uniformly, then one of its templates): what a
    corpus gets when sentences may repeat. Distinct sentences cap a template at the strings it can say, so templates
    with few fillings fall far below this share (benchmarks/intent_coverage.py)."""
    shares: dict[str, float] = {}
    for templates in TEMPLATES.values():
        for template in templates:
            intent = intent_of(template)
            shares[intent] = shares.get(intent, 0.0) + 1 / len(TEMPLATES) / len(templates)
    return shares


def _sentence_stream(seed: int) -> Iterator[str]:
    return (utterance.text for utterance in _utterance_stream(seed))


TEST_SEED_OFFSET = 1_000_003  # the held-out sentences come from a stream of their own


def utterances(texts: Sequence[str], seed: int = 0) -> dict[str, Utterance]:
    """The meaning of each grammar sentence in `texts`, found by replaying the streams `split_sentences(seed=seed)`
    drew them from (train sentences from the train stream, held-out ones from the test stream; the first draw of a
    string is the one the corpus kept). Texts the grammar did not make are left out."""
    found: dict[str, Utterance] = {}
    for stream_seed, held_out in ((seed, False), (seed + TEST_SEED_OFFSET, True)):
        wanted = {t for t in texts if is_held_out(t) == held_out}
        for draws, utterance in enumerate(_utterance_stream(stream_seed)):
            if not wanted or draws >= 200 * len(texts) + 1000:
                break
            if utterance.text in wanted:
                wanted.discard(utterance.text)
                found[utterance.text] = utterance
    return found


TEXT_SEED_OFFSET = 2_000_003  # sentences for text-only training come from a third stream


def text_only_utterances(n: int, seed: int = 0, distinct: bool = True) -> list[Utterance]:
    """`n` grammar utterances for text-only training (no clip is rendered for them), from a stream of their own;
    never a held-out string (`is_held_out`), so the held-out sentences stay unseen in any form. Distinct by default;
    `distinct=False` keeps every draw, repeats included, so each intent gets its `intent_shares` share instead of the
    few strings a template with few fillings can say."""
    kept: list[Utterance] = []
    seen: set[str] = set()
    for draws, utterance in enumerate(_utterance_stream(seed + TEXT_SEED_OFFSET)):
        if len(kept) >= n:
            break
        if draws >= 100 * n + 1000:
            kind = "distinct " if distinct else ""
            raise ValueError(f"only {len(kept)} {kind}training sentences found for the {n} asked")
        if is_held_out(utterance.text) or (distinct and utterance.text in seen):
            continue
        seen.add(utterance.text)
        kept.append(utterance)
    return kept


def is_held_out(text: str) -> bool:
    """Whether a sentence belongs to the test side: a property of the string itself, so train and test are
    exact-string disjoint whatever the seeds and sizes (about one sentence in eight is held out)."""
    return zlib.crc32(text.encode()) % 8 == 0


def _distinct(stream: Iterator[str], n: int, keep: Callable[[str], bool], max_draws: int) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for draws, text in enumerate(stream):
        if len(out) >= n:
            break
        if draws >= max_draws:
            raise ValueError(f"only {len(out)} distinct sentences found for the {n} asked")
        if text not in seen and keep(text):
            seen.add(text)
            out.append(text)
    return out


def build_sentences(n: int, seed: int = 0) -> list[str]:
    """`n` distinct grammar sentences, deterministic in `seed` (both train and held-out kinds)."""
    return _distinct(_sentence_stream(seed), n, lambda _: True, max_draws=100 * n + 1000)


def split_sentences(
    n_train: int, n_test: int, seed: int = 0, exclude: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """Distinct train and test sentences; no test string can ever be a train string (see `is_held_out`).

    `exclude` removes strings from training (e.g. the real held-out prompts, so their exact text is never trained).
    """
    banned = set(exclude)
    train = _distinct(_sentence_stream(seed), n_train, lambda t: not is_held_out(t) and t not in banned,
                      max_draws=100 * n_train + 1000)
    test = _distinct(_sentence_stream(seed + TEST_SEED_OFFSET), n_test, is_held_out, max_draws=200 * n_test + 1000)
    return train, test
