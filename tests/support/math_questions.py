"""Grade-school math word problems written for the test suite in GSM8K's style (one to three steps each).

They are not GSM8K's own questions: CI runs on a clean checkout without ``../shared/data``, and the held-out
GSM8K file stays held out for the benchmarks. Tests that need "questions the anchors were not recorded from"
split this list (see tests/unit/test_kvcomm_claim.py).
"""

QUESTIONS = (
    "A baker makes 36 cookies and packs them into bags of 4. How many bags does she fill?",
    "Liam has 15 marbles. He gives 6 to his sister and then finds 9 more. How many marbles does he have now?",
    "A bus carries 42 passengers. At the first stop 17 get off and 8 get on. How many passengers are on the bus?",
    "Each notebook costs 3 dollars. Maria buys 7 notebooks and pays with a 50 dollar bill. How much change does "
    "she get?",
    "A garden has 5 rows of tomato plants with 12 plants in each row. How many tomato plants are in the garden?",
    "Noah runs 3 miles every weekday and 5 miles on each weekend day. How many miles does he run in one week?",
    "A pizza is cut into 8 slices. If 3 friends each eat 2 slices, how many slices are left?",
    "Emma earns 12 dollars an hour babysitting. She works 4 hours on Friday and 6 hours on Saturday. How much "
    "does she earn?",
    "A library has 240 books on 6 shelves, with the same number on each shelf. How many books are on each shelf?",
    "Jack is 4 years older than his brother, who is 9. How old will Jack be in 5 years?",
    "A farmer collects 18 eggs on Monday, 24 on Tuesday and 21 on Wednesday. He sells them in cartons of 12. "
    "How many full cartons can he fill?",
    "A car uses 1 gallon of gas every 30 miles. How many gallons does it need for a trip of 210 miles?",
    "Olivia buys 3 packs of pencils with 10 pencils in each pack. She gives away 7 pencils. How many pencils "
    "does she keep?",
    "A movie ticket costs 9 dollars and popcorn costs 4 dollars. How much do 3 tickets and 2 popcorns cost?",
    "There are 28 students in a class. Half of them bring lunch from home and the rest buy lunch. How many "
    "students buy lunch?",
    "A shop sells apples at 2 for 1 dollar. How much do 14 apples cost?",
    "Sam reads 25 pages a day. His book has 300 pages. How many days does he need to finish it?",
    "A rectangle is 9 meters long and 6 meters wide. What is its perimeter in meters?",
    "Ava saves 15 dollars each week. After 8 weeks she spends 45 dollars on a game. How much money does she have "
    "left?",
    "A factory makes 125 toys an hour and runs for 8 hours a day. How many toys does it make in 2 days?",
    "Ben has 3 times as many stickers as Lucy. Lucy has 14 stickers. How many stickers do they have together?",
    "A train leaves at 9:15 and the trip takes 2 hours and 50 minutes. At what minute past the hour does it "
    "arrive?",
    "A water tank holds 500 liters. It is 40 percent full. How many more liters are needed to fill it?",
    "Mia plants 4 flower beds with 15 tulips each, but 9 tulips do not grow. How many tulips grow?",
)
