"""Out-of-scope inputs for the demo model and the reply it gives them.

The demo model only knows one coloured shape per image. Greetings, questions about anything else and
requests get one short reply in the input's language that says what it can do (:data:`SCOPE_REPLY`). Inputs
come from templates with slots (``{country}``, ``{n}`` ...); ``TRAIN_INPUTS`` are used in training,
``HELD_OUT_INPUTS`` only to measure the out-of-scope rate on inputs the model has never seen (``visualglm
eval oos``).
"""

from __future__ import annotations

import random
import re

from visualglm.demo.phrasings import surface

SCOPE_REPLY = {
    "en": "I can only describe the image: its shape and its color.",
    "zh": "我只能描述图片中图形的形状和颜色。",
}

_EN_TRAIN = """
hello
hi
hey
hi there
hello there
good morning
good evening
hey, how are you
how are you
how are you doing today
nice to meet you
thanks
thank you
thank you very much
bye
goodbye
see you later
who are you
what is your name
what are you
are you a robot
are you human
who made you
what can you do
what do you know
can you help me
what are you able to do
what is the capital of {country}
who wrote {book}
how far away is the moon
what year is it
what time is it
what is the weather like today
will it rain tomorrow
who is {person}
how tall is {tall}
what is the population of {country}
what is {n} plus {m}
what is {n} times {m}
{n} + {m} = ?
how much is {n} minus {m}
solve {n}x = {m}
tell me a joke
write a poem about {topic}
write a story about {topic}
translate "{phrase}" into {language}
help me with my homework
sing a song
recommend a good movie
book a flight to {city}
give me a recipe for {food}
set an alarm for {n} am
play some music
send an email to my boss
summarize this article
write some python code
where is the shape
how big is the shape
what is the size of the {s}
who drew this {pic}
when was this {pic} taken
how many pixels does the {pic} have
is the shape moving
what is the shape made of
how old is this {pic}
why is the {s} here
i like {food}
my name is {person}
what should i do today
do you speak {language}
what is {noun}
what's {noun}
tell me about {noun}
what is the {attr} of {thing}
how do i {task}
can you {task}
please {task}
i am {feeling}
i feel {feeling}
good night
where is {city}
what does "{phrase}" mean
is {city} far from {city}
what's new
how is it going
where are you from
what is your favorite color
do you like music
can you hear me
explain {noun} to me
can you book a table for me
write an essay about {topic}
what is the square root of {n}
how many days are in a year
who invented the telephone
what language do you speak
do you dream
are you happy
how much does the shape cost
what is the shape thinking
how fast is the {s}
does the shape smell nice
what is behind the shape
who lives here
can you cook
tell me a story
what's happening
what's the matter
what is the purpose of {noun}
what is the secret of happiness
tell me about the culture of {country}
what happened in {country} last year
what should i cook tonight
what should i wear today
where should i go on holiday
how old is the shape
how long is the {s}
what temperature is the shape
is the shape alive
what is the shape's name
what does the {s} sound like
who is your favorite singer
what do you think about {noun}
i need a new {word}
where can i buy the {word}
my {word} is broken
i lost my {word}
how much does the {word} cost
i want the {word}
{word}
{word} please
how do i clean my {word}
recommend a good {word}
"""
_EN_HELD_OUT = """
good afternoon
what's up
how old are you
where do you live
who is the president of {country}
what is the meaning of life
explain quantum physics to me
can you order a pizza for me
write a letter to my friend
what is {n} divided by {m}
how many people live in {city}
what is the best programming language
do you have feelings
how heavy is the shape
where was this {pic} made
can you draw a cat
what should i eat for dinner
tell me about the history of {country}
"""
_ZH_TRAIN = """
你好
您好
嗨
早上好
晚上好
你好吗
谢谢
谢谢你
再见
很高兴认识你
你是谁
你叫什么名字
你是机器人吗
谁创造了你
你能做什么
你会什么
{country}的首都是哪里
今天天气怎么样
明天会下雨吗
现在几点了
今年是哪一年
{n}加{m}等于多少
{n}乘以{m}是多少
{n}减{m}是几
给我讲个笑话
帮我写一首关于{topic}的诗
写一个关于{topic}的故事
把这句话翻译成英文
推荐一部好看的电影
帮我订一张去{city}的机票
唱首歌吧
帮我做作业
图形在图片的什么位置
这个图形有多大
这张图是谁画的
这张照片是什么时候拍的
图形是用什么做的
你喜欢吃{food}吗
{person}是谁
我叫{person}
你会说{language}吗
{noun}是什么
什么是{noun}
给我介绍一下{noun}
{thing}的{attr}是多少
怎么{task}
你能帮我{task}吗
请帮我{task}
我很{feeling}
晚安
{city}在哪里
{city}离{city}远吗
最近怎么样
你从哪里来
你最喜欢什么颜色
你喜欢音乐吗
你能听到我说话吗
给我解释一下{noun}
帮我订个餐厅
写一篇关于{topic}的文章
{n}的平方是多少
一年有多少天
电话是谁发明的
你会做饭吗
你开心吗
你会做梦吗
这个图形多少钱
这个图形跑得快吗
图形后面有什么
给我讲个故事
最近忙什么呢
{noun}有什么用
幸福的秘诀是什么
给我讲讲{country}的文化
今晚做什么菜好
今天穿什么衣服好
假期去哪里玩好
这个图形几岁了
这个图形是活的吗
这个图形叫什么名字
你觉得{noun}怎么样
{word}是什么
我需要一个新的{word}
哪里可以买到{word}
我的{word}坏了
我的{word}丢了
{word}多少钱
跟我说说{word}
我想要{word}
{word}
请给我{word}
怎么清洗{word}
推荐一个好的{word}
"""
_ZH_HELD_OUT = """
下午好
你今年几岁了
你住在哪里
{country}的总统是谁
人生的意义是什么
请解释一下量子力学
帮我点一份外卖
给朋友写一封信
{n}除以{m}等于几
{city}有多少人口
哪种编程语言最好
你有感情吗
这个图形有多重
晚饭吃什么好
你能画一只猫吗
这张图是在哪里做的
"""

_EN_SLOTS = {
    "country": ("france", "japan", "china", "brazil", "canada", "italy", "egypt", "germany"),
    "city": ("paris", "london", "tokyo", "beijing", "new york", "berlin", "rome"),
    "book": ("hamlet", "war and peace", "don quixote", "the odyssey"),
    "person": ("einstein", "shakespeare", "mozart", "alice", "bob", "tom"),
    "tall": ("mount everest", "the eiffel tower", "a giraffe"),
    "topic": ("the sea", "love", "autumn", "a dog", "the moon", "friendship"),
    "phrase": ("good night", "thank you", "i love you", "see you tomorrow"),
    "language": ("french", "german", "spanish", "japanese", "chinese"),
    "food": ("pancakes", "pizza", "noodles", "apple pie", "dumplings"),
    "pic": ("image", "picture", "photo"),
    "s": ("circle", "rectangle", "triangle"),
    "noun": ("love", "music", "a black hole", "machine learning", "the internet", "gravity", "democracy",
             "a computer", "football", "coffee"),
    "attr": ("price", "height", "weight", "age", "speed", "temperature", "name", "size"),
    "thing": ("the sun", "a car", "water", "the earth", "an elephant", "gold", "this city", "my phone"),
    "task": ("cook rice", "learn english", "fix my bike", "lose weight", "find a job", "open this file",
             "call my mother", "make a cake", "plan a trip"),
    "feeling": ("sad", "happy", "tired", "bored", "hungry"),
    # everyday things (no colour or shape words, none of the held-out inputs' words): many different words, so
    # that what marks an input as out of scope is not a short list of topics
    "word": tuple("""
        umbrella bicycle guitar kitchen window garden mountain river teacher doctor hospital airport train
        ticket wallet passport keyboard printer camera battery charger sofa pillow blanket jacket shoes
        socks bottle cup spoon knife sandwich cheese chocolate banana lemon carrot potato bread soup salad
        tea juice milk sugar hammer ladder candle mirror clock watch necklace piano violin drum movie song
        novel newspaper magazine email password website game puzzle kite boat truck bus taxi road bridge
        castle museum library school office market bank hotel restaurant beach island forest desert volcano
        rainbow cloud storm snow winter summer holiday birthday wedding party gift dog horse rabbit tiger
        lion monkey bird fish spider flower tree rose
    """.split()),
}
_ZH_SLOTS = {
    "country": ("法国", "日本", "中国", "巴西", "加拿大", "意大利", "埃及", "德国"),
    "city": ("巴黎", "伦敦", "东京", "北京", "纽约", "上海", "罗马"),
    "person": ("爱因斯坦", "莎士比亚", "李白", "小明", "张三"),
    "topic": ("大海", "爱情", "秋天", "小狗", "月亮", "友谊"),
    "language": ("法语", "德语", "英语", "日语"),
    "food": ("饺子", "面条", "苹果", "火锅"),
    "noun": ("爱情", "音乐", "黑洞", "机器学习", "互联网", "引力", "电脑", "足球", "咖啡", "数学"),
    "attr": ("价格", "高度", "重量", "年龄", "速度", "温度", "面积"),
    "thing": ("太阳", "汽车", "地球", "大象", "黄金", "这座城市", "我的手机"),
    "task": ("做饭", "学英语", "修自行车", "减肥", "找工作", "打开这个文件", "给妈妈打电话", "做蛋糕", "安排旅行"),
    "feeling": ("难过", "开心", "累", "无聊", "饿"),
    "word": tuple("""
        雨伞 自行车 吉他 厨房 窗户 花园 高山 河流 老师 医生 医院 机场 火车 车票 钱包 护照 键盘 打印机 相机
        电池 充电器 沙发 枕头 被子 夹克 鞋子 袜子 瓶子 杯子 勺子 小刀 三明治 奶酪 巧克力 香蕉 柠檬 胡萝卜
        土豆 米饭 面包 汤 沙拉 茶 果汁 牛奶 糖 盐 锤子 梯子 蜡烛 镜子 闹钟 手表 项链 钢琴 小提琴 鼓 电影
        歌曲 小说 报纸 杂志 邮件 密码 网站 游戏 拼图 风筝 轮船 卡车 公交车 出租车 马路 桥 城堡 博物馆
        图书馆 学校 办公室 市场 银行 酒店 餐厅 海滩 岛屿 森林 沙漠 火山 彩虹 云 暴风雨 雪 冬天 夏天 假期
        生日 婚礼 聚会 礼物 狗 马 兔子 老虎 狮子 猴子 鸟 鱼 蜘蛛 花 树 玫瑰
    """.split()),
}
_SLOT = re.compile(r"\{(\w+)\}")


def _inputs(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.strip().splitlines() if t.strip())


TRAIN_INPUTS = {"en": _inputs(_EN_TRAIN), "zh": _inputs(_ZH_TRAIN)}
HELD_OUT_INPUTS = {"en": _inputs(_EN_HELD_OUT), "zh": _inputs(_ZH_HELD_OUT)}
SPLIT_INPUTS = {"train": TRAIN_INPUTS, "held-out": HELD_OUT_INPUTS}


def fill_input(template: str, lang: str, rng: random.Random) -> str:
    """``template`` with its slots filled (numbers 1..99, names from fixed lists)."""
    slots = _EN_SLOTS if lang == "en" else _ZH_SLOTS

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in ("n", "m"):
            return str(rng.randint(1, 12 if lang == "en" and "am" in template else 99))
        return rng.choice(slots[name])

    return _SLOT.sub(value, template)


def out_of_scope(lang: str, rng: random.Random, split: str = "train") -> tuple[str, str]:
    """``(input, reply)``: an out-of-scope input of ``split`` in ``lang`` with a surface form."""
    template = rng.choice(SPLIT_INPUTS[split][lang])
    text = fill_input(template, lang, rng)
    question = text.startswith(("what", "who", "how", "where", "when", "why", "which", "is ", "are ", "do ", "can ",
                                "will ")) or text.endswith(("吗", "呢", "哪里", "多少", "几", "什么", "谁"))
    if text.endswith("?"):
        return text[:1].upper() + text[1:] if rng.random() < 0.5 else text, SCOPE_REPLY[lang]
    return surface(text, lang, rng, imperative=not question), SCOPE_REPLY[lang]


def expand_input(template: str, lang: str) -> list[str]:
    """Every filled form of an out-of-scope template (numbers left as ``{n}``/``{m}``)."""
    slots = _EN_SLOTS if lang == "en" else _ZH_SLOTS
    forms = [template]
    for name in sorted(set(_SLOT.findall(template)) - {"n", "m"}):
        forms = [f.replace("{" + name + "}", v) for f in forms for v in slots[name]]
    return forms
