#!/usr/bin/env python3
"""Builds the embedded example data in shards/: emoji drawn by several artists as a real
image-caption retrieval set.

- Held-out style: the 64x64 PNGs of the npm package emoji-datasource-twitter@16.0.0
  (Twemoji, CC-BY-4.0).
- Training styles: the 64x64 PNGs of emoji-datasource-google@16.0.0 (Noto Emoji,
  Apache-2.0), and the SVG icons of the Iconify JSON sets in ICONIFY_STYLES: Fluent Emoji
  in its Flat and Color styles (Microsoft, MIT), Emoji One 2.3 (CC-BY-4.0), Firefox OS
  Emoji (Mozilla; visual design CC-BY-4.0) and Noto Emoji v1 (Google, Apache-2.0). The SVGs
  are rasterized to 64x64 RGBA PNG by @resvg/resvg-wasm@2.6.2, a WebAssembly build of
  resvg, which gives the same pixels on every machine.
- Every image is flattened onto a white background and re-encoded as RGB PNG by
  `vlp shards write --format png`.
- Captions, two per image (like COCO's five): the lower-cased Unicode name
  ("grinning face with smiling eyes") and "label: tags" from emojibase-data@17.0.0
  ("grinning face with smiling eyes: eye, face, grin, smile").
- Image ids: the emoji's code points, shared by all styles.
- Only emoji that have an image in every style of emoji-datasource (1857). Iconify sets
  key their icons by name: an emoji's icon is the one named by fluent-emoji-flat's
  chars.json for its code points or by its emojibase label, or else by an older spelling
  ("flag for X", "cat face", the Unicode name) that no other emoji claims; Firefox OS Emoji
  uses the table FXEMOJI_NAMES. An emoji that a set does not draw, or that resvg cannot
  render, is left out of that style's shards.

google-style and Iconify-style shards are for training, twitter-style shards the held-out
zero-shot set: a model that learned the concepts, not the pixels, transfers from one to the
other.

    python3 scripts/make_emoji_shards.py --vlp target/release/vlp --out shards

Needs npm and node (to fetch the packages and run the rasterizer) and the vlp binary.
Writes OUT/emoji-STYLE-*.tar and OUT/emoji-STYLE-manifest.json for each style, and, with
the google style, OUT/emoji-tokenizer.json (WordPiece, 2000 tokens, trained on the
google-style captions). `--styles` builds only the styles named. Every output is the same
bytes on every run.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import tarfile
import tempfile
import unicodedata
from pathlib import Path

PACKAGES = {
    "google": "emoji-datasource-google@16.0.0",
    "twitter": "emoji-datasource-twitter@16.0.0",
    "emojibase": "emojibase-data@17.0.0",
}
STYLES_WITH_IMAGES = ("apple", "google", "twitter", "facebook")

# Training styles drawn from Iconify JSON SVG sets: style -> (package, margin). The margin is
# the fraction of the icon's box cut off on each side before rasterizing, so that the emoji
# fills the 64x64 frame about as much as in emoji-datasource's images (most span 60-63 px):
# Fluent's icons leave about 2/32 of their box empty on each side.
ICONIFY_STYLES = {
    "fluent": ("@iconify-json/fluent-emoji-flat@1.2.6", 1 / 32),
    "emojione": ("@iconify-json/emojione@1.2.3", 0.0),
    "fxemoji": ("@iconify-json/fxemoji@1.2.2", 0.0),
    "notov1": ("@iconify-json/noto-v1@1.2.5", 0.0),
    "fluentcolor": ("@iconify-json/fluent-emoji@1.2.7", 1 / 32),
}
FLUENT_FLAT = "@iconify-json/fluent-emoji-flat@1.2.6"  # its chars.json names the emoji
RESVG = "@resvg/resvg-wasm@2.6.2"
ICON_SIZE = 64
STYLES = ("google", "twitter", *ICONIFY_STYLES)

# Firefox OS Emoji: code points (as image ids, without fe0f) -> icon name, for the chosen emoji
# it draws. The Iconify set is converted from the SVGs of github.com/mozilla/fxemoji (commit
# 270af34), svgs/FirefoxEmoji/u<code point>-<name>.svg; its names are Mozilla's own (u1F617
# is "kiss", u1F48F "couplekiss"), so they cannot be derived from the Unicode names.
FXEMOJI_NAMES = dict(item.split(":") for item in """
1f004:mahjong 1f0cf:playingcardblackjoker 1f170:negativesquaredlatincaptiala
1f171:negativesquaredlatincaptialb 1f17e:negativesquaredlatincaptialo
1f17f:negativesquaredlatincapitalletterp 1f18e:negativesquaredab 1f191:squaredcl
1f192:squaredcool 1f193:squaredfree 1f194:squaredid 1f195:squarednew 1f196:squaredng
1f197:squaredok 1f198:squaredsos 1f199:squaredup 1f19a:squaredvs 1f1e8-1f1f3:chineseflag
1f1ea-1f1f8:spanishflag 1f1eb-1f1f7:franceflag 1f1ec-1f1e7:greatbritainflag
1f1ee-1f1f9:italianflag 1f1ef-1f1f5:japanflag 1f1f0-1f1f7:koreaflag 1f1f7-1f1fa:russianflag
1f201:squaredkatakanakoko 1f202:squaredkatakanasa 1f21a:cjkunifiedideograph-i
1f22f:cjkunifiedideograph-a 1f232:cjkunifiedideograph-c 1f233:cjkunifiedideograph-d
1f234:cjkunifiedideograph-e 1f235:cjkunifiedideograph-f 1f236:cjkunifiedideograph-g
1f237:cjkunifiedideograph-h 1f238:cjkunifiedideograph-j 1f239:cjkunifiedideograph-k
1f23a:cjkunifiedideograph-b 1f250:circledideographadvantage 1f251:circledideographaccept
1f300:cyclone 1f301:foggy 1f302:umbrella 1f303:nightwithstars 1f304:sunriseovermountains
1f305:sunrise 1f306:cityscapeatdusk 1f307:sunsetoverbuildings 1f308:rainbow
1f309:bridgeatnight 1f30a:wave 1f30b:volcano 1f30c:milkyway 1f30d:europeafricaglobe
1f30e:americasglobe 1f30f:asiaaustraliaglobe 1f310:meridianglobe 1f311:newmoon
1f312:waxingcrescentmoon 1f313:firstquartermoon 1f314:waxinggibbousmoon 1f315:fullmoon
1f316:waningbibbousmoon 1f317:lastquartermoon 1f318:waningcrescentmoon 1f319:crescentmoon
1f31a:newmoonwithface 1f31b:firstquartermoonface 1f31c:lastquartermoonface
1f31d:fullmoonwithface 1f31e:sunwithface 1f31f:star 1f320:shootingstar 1f321:thermometer
1f324:whitesunsmallcloud 1f325:whitesunbehindcloud 1f326:sunraincloud 1f327:raincloud
1f328:snowcloud 1f329:stormcloud 1f32a:tornado 1f32b:fog 1f330:acorn 1f331:seedling
1f332:evergreen 1f333:deciduoustree 1f334:palmtree 1f335:cactus 1f336:chilipepper
1f337:tulip 1f338:cherryblossom 1f339:rose 1f33a:hibiscus 1f33b:sunflower 1f33c:blossom
1f33d:earofmaize 1f33e:earofrice 1f33f:herb 1f340:fourleafclover 1f341:mapleleaf
1f342:fallingleaf 1f343:leaffluttering 1f344:mushroom 1f345:tomato 1f346:aubergine
1f347:grapes 1f348:melon 1f349:watermelon 1f34a:tangerine 1f34b:lemon 1f34c:banana
1f34d:pineapple 1f34e:redapple 1f34f:greenapple 1f350:pear 1f351:peach 1f352:cherries
1f353:strawberry 1f354:hamburger 1f355:sliceofpizza 1f356:meatonbone 1f357:poultryleg
1f358:ricecracker 1f359:riceball 1f35a:cookedrice 1f35b:curryandrice 1f35c:steamingbowl
1f35d:spaghetti 1f35e:bread 1f35f:frenchfries 1f360:roastedsweetpotato 1f361:dango
1f362:oden 1f363:sushi 1f364:friedshrimp 1f365:fishcakeswirl 1f366:softicecream
1f367:shavedice 1f368:icecream 1f369:doughnut 1f36a:cookie 1f36b:chocolatebar 1f36c:candy
1f36d:lollipop 1f36e:custard 1f36f:honeypot 1f370:shortcake 1f371:bentobox 1f372:potoffood
1f373:cooking 1f374:forkandknife 1f375:teacupwithouthandle 1f376:sakebottleandcup
1f377:wineglass 1f378:cocktailglass 1f379:tropicaldrink 1f37a:beermug 1f37b:clinkingbeermugs
1f37c:babybottle 1f37d:forkknife 1f380:bow 1f381:present 1f382:birthdaycake
1f383:jackolantern 1f384:christmastree 1f385:fatherchristmas 1f386:fireworks
1f387:fireworksparkler 1f388:balloon 1f389:partypopper 1f38a:confetti 1f38b:tanabatatree
1f38c:crossedflags 1f38d:pinedecoration 1f38e:japanesedolls 1f38f:carpstreamer
1f390:windchime 1f391:moonviewingceremony 1f392:schoolsatchel 1f393:graduationcap
1f396:militarymedal 1f397:reminder 1f399:studiomic 1f39a:levelslider 1f39b:controlknob
1f39e:filmframes 1f39f:admissiontickets 1f3a0:carouselhorse 1f3a1:ferriswheel
1f3a2:rollercoaster 1f3a3:fishingpoleandfish 1f3a4:microphone 1f3a5:moviecamera 1f3a6:cinema
1f3a7:headphone 1f3a8:artistpalette 1f3a9:tophat 1f3aa:circustent 1f3ab:ticket
1f3ac:clapperboard 1f3ad:performingarts 1f3ae:videogame 1f3af:directhit 1f3b0:slotmachine
1f3b1:billiards 1f3b2:gamedie 1f3b3:bowling 1f3b4:flowerplayingcards 1f3b5:musicalnote
1f3b6:multiplemusicalnotes 1f3b7:saxophone 1f3b8:guitar 1f3b9:musicalkeyboard 1f3ba:trumpet
1f3bb:violin 1f3bc:musicalscore 1f3bd:runningshirt 1f3be:tennisball 1f3bf:skiandskiboot
1f3c0:basketballandhoop 1f3c2:snowboarder 1f3c3:running 1f3c4:surfer 1f3c5:sportsmedal
1f3c6:trophy 1f3c7:horseracing 1f3c8:americanfootball 1f3c9:rugbyfootball 1f3ca:swimming
1f3cb:weightlifter 1f3cc:golfer 1f3cd:motorcycle 1f3ce:racecar 1f3d4:snowmountains
1f3d5:camping 1f3d6:beachumbrella 1f3d7:construction 1f3d8:housebuildings 1f3d9:cityscape
1f3db:classicalbuilding 1f3dc:desert 1f3dd:desertisland 1f3de:nationalpark 1f3df:stadium
1f3e0:housebuilding 1f3e1:housewithgarden 1f3e2:officebuilding 1f3e3:japanesepostoffice
1f3e4:europeanpostoffice 1f3e5:hospital 1f3e6:bank 1f3e7:automatedtellermachine 1f3e8:hotel
1f3e9:lovehotel 1f3ea:conveniencestore 1f3eb:school 1f3ec:departmentstore 1f3ed:factory
1f3ee:izakayalantern 1f3ef:japanesecastle 1f3f0:europeancastle 1f3f4:blackwaving
1f3f5:rosette 1f3f7:label 1f400:rat 1f401:mouseside 1f402:ox 1f403:waterbuffalo 1f404:cow
1f405:tigerside 1f406:leopardside 1f407:bunnyside 1f408:catside 1f409:dragonside
1f40a:crocodile 1f40b:whale 1f40c:snail 1f40d:snake 1f40e:horse 1f40f:ram 1f410:goat
1f411:sheep 1f412:monkey 1f413:rooster 1f414:chicken 1f415:dogside 1f416:pigside 1f417:boar
1f418:elephant 1f419:octopus 1f41a:spiralshell 1f41b:bug 1f41c:ant 1f41d:honeybee
1f41e:ladybeetle 1f41f:fish 1f420:tropicalfish 1f421:blowfish 1f422:turtle
1f423:hatchingchick 1f424:babychick 1f425:frontfacingchick 1f426:bird 1f427:penguin
1f428:koala 1f429:poodle 1f42a:dromedarycamel 1f42b:bactriancamel 1f42c:dolphin 1f42d:mouse
1f42e:cowface 1f42f:tiger 1f430:bunny 1f431:cat 1f432:dragonhead 1f433:spurtingwhale
1f434:horseface 1f435:monkeyface 1f436:dog 1f437:pig 1f438:frog 1f439:hampster
1f43a:wolfface 1f43b:bear 1f43c:pandaface 1f43d:pigsnout 1f43e:pawprints 1f43f:chipmunk
1f440:eyes 1f441:eye 1f442:ear 1f443:nose 1f444:mouth 1f445:tongue 1f446:up 1f447:down
1f448:left 1f449:right 1f44a:fistedhand 1f44b:waving 1f44c:aok 1f44d:thumbsup
1f44e:thumbsdown 1f44f:clap 1f450:hands 1f451:crown 1f452:womanshat 1f453:glasses 1f454:tie
1f455:mansshirt 1f456:jeans 1f457:dress 1f458:kimono 1f459:bikini 1f45a:womansshirt
1f45b:pinkwallet 1f45c:handbag 1f45d:makeupbag 1f45e:mensshoe 1f45f:mensrunner 1f460:heels
1f461:sandals 1f462:boot 1f463:footprints 1f464:contact 1f465:contact2 1f466:boy 1f467:girl
1f468:man 1f469:woman 1f46a:family 1f46b:girlguy 1f46c:guyguy 1f46d:girlgirl 1f46e:cop
1f46f:bunny-ears 1f470:bride 1f471:blonde 1f472:guapimao 1f473:turban 1f474:gpa 1f475:gma
1f476:baby 1f477:construct 1f478:princess 1f479:ogre 1f47a:japaneseangrymask 1f47b:ghost
1f47c:babyangel 1f47d:alien 1f47e:alienmonster 1f47f:imp 1f480:skull 1f481:waitress
1f482:guardsman 1f483:dancer 1f484:lipstick 1f485:nailpolish 1f486:headmassage 1f487:haircut
1f488:barberpole 1f489:syringe 1f48a:pill 1f48b:kissmark 1f48c:loveletter 1f48d:ring
1f48e:gem 1f48f:couplekiss 1f490:bouquet 1f491:couple 1f492:wedding 1f493:beating-heart
1f494:brokenheart 1f495:2hearts 1f496:sparklingheart 1f497:growingheart 1f498:heartarrow
1f499:heartblue 1f49a:heartgreen 1f49b:heartyellow 1f49c:heartpurple 1f49d:heartribbon
1f49e:revolvinghearts 1f49f:heartdecoration 1f4a0:diamondshapewithdotinside 1f4a1:lightbulb
1f4a2:anger 1f4a3:bomb 1f4a4:zzz 1f4a5:collision 1f4a6:sweatsplash 1f4a7:droplet 1f4a8:dash
1f4a9:poo 1f4aa:flexbicep 1f4ab:dizzy 1f4ac:speechbubble 1f4ad:thoughtbaloon
1f4ae:whiteflower 1f4af:hundredpointssymbol 1f4b0:moneybag 1f4b1:currencyexchange
1f4b2:heavydollarsign 1f4b3:creditcard 1f4b4:banknoteyen 1f4b5:banknotedollar
1f4b6:banknoteeuro 1f4b7:banknotepound 1f4b8:moneywithwings 1f4b9:chartupwardstrendyen
1f4ba:seat 1f4bb:personalcomputer 1f4bc:briefcase 1f4bd:minidisc 1f4be:floppydisk2
1f4bf:opticaldisc 1f4c0:dvd 1f4c1:filefolder 1f4c2:openfilefolder 1f4c3:pagewithcurl
1f4c4:pagefacingup 1f4c5:calendar 1f4c6:tearoffcalendar 1f4c7:cardindex
1f4c8:chartupwardstrend 1f4c9:chartdownwardstrend 1f4ca:barchart 1f4cb:clipboard
1f4cc:pushpin 1f4cd:roundpushpin 1f4ce:paperclip 1f4cf:straightruler 1f4d0:triangularruler
1f4d1:bookmarktab 1f4d2:ledger 1f4d3:notebook 1f4d4:notebookdecorativecover 1f4d5:closedbook
1f4d6:openbook 1f4d7:greenbook 1f4d8:bluebook 1f4d9:orangebook 1f4da:books 1f4db:namebadge
1f4dc:scroll 1f4dd:memo 1f4de:telephonereceiver2 1f4df:pager 1f4e0:faxmachine
1f4e1:satelliteantenna 1f4e2:loudspeaker 1f4e3:megaphone 1f4e4:outbox 1f4e5:inboxtray
1f4e6:package 1f4e7:email 1f4e8:incomingenvelope 1f4e9:envelopedownarrowabove
1f4ea:closedmailboxlowered 1f4eb:closedmailboxraised 1f4ec:openmailboxraised
1f4ed:openmailboxlowered 1f4ee:postbox 1f4ef:postalhorn 1f4f0:newspaper 1f4f1:cellphone
1f4f2:phonerightarrowleft 1f4f3:vibrationmode 1f4f4:mobilephoneoff 1f4f5:nomobilephones
1f4f6:antennawithbars 1f4f7:camera 1f4f8:camerawithflash 1f4f9:handheldvideocamera
1f4fa:television 1f4fb:radio 1f4fc:videocasette 1f4fd:filmprojector
1f500:twistedrightwardsarrows 1f501:clockwiserightwardsleftwardscirclearrows
1f502:clockwiserightwardsleftwardscirclearrowsone 1f503:clockwisedownupcircledarrows
1f504:anticlockwiseupwardsanddownwardsarrows 1f505:lowbrightness 1f506:highbrightness
1f507:speakercancellation 1f508:speaker 1f509:speakeronesoundwave 1f50a:speaker3soundwaves
1f50b:battery 1f50c:electricplug 1f50d:leftmagnifyingglass 1f50e:rightmagnifyingglass
1f50f:lockwithinkpen 1f510:lockandkey 1f511:key 1f512:lock 1f513:openlock 1f514:bell
1f515:bellcancellation 1f516:bookmark 1f517:linksymbol 1f518:radiobutton
1f519:backwithleftwardsarrow 1f51a:endwithleftwardsarrow 1f51b:onarrowleftright
1f51c:soonwithrightarrow 1f51d:topwithupwardsarrow 1f51e:nooneunder18symbol 1f51f:ten
1f520:inputsymbolforlatincapitalletters 1f521:inputsymbolforlatinsmallletters
1f522:inputsymbolfornumbers 1f523:inputsymbolforsymbols 1f524:inputsymbolforlatinletters
1f525:fire 1f526:electrictorch 1f527:wrench 1f528:hammer 1f529:nutandbolt 1f52a:hocho
1f52b:pistol 1f52c:microscope 1f52d:telescope 1f52e:crystalball 1f52f:sixpointedstarwithdot
1f530:japanesesymbolforbeginner 1f531:tridentemblem 1f532:blacksquarebutton
1f533:whitesquarebutton 1f534:largeredcircle 1f535:largebluecircle 1f536:largeorangediamond
1f537:largebluediamond 1f538:smallorangediamond 1f539:smallbluediamond
1f53a:uppointingredtriangle 1f53b:downpointingredtriangle 1f53c:uppointingsmallredtrisngle
1f53d:downpointingsmallredtrisngle 1f549:omsymbol 1f54a:doveofpeace 1f550:clock1oclock
1f551:clock2oclock 1f552:clock3oclock 1f553:clock4oclock 1f555:clock6oclock
1f556:clock7oclock 1f55b:clock12oclock 1f55c:clock1thirty 1f55d:clock2thirty
1f55e:clock3thirty 1f55f:clock4thirty 1f560:clock5thirty 1f561:clock6thirty
1f567:clock12thirty 1f56f:candle 1f570:manltepiececlock 1f573:hole
1f574:maninbusinesssuitlevitating 1f575:sleuthspy 1f576:darksunglasses 1f577:spider
1f578:spiderweb 1f587:linkedpaperclips 1f58a:lowerleftpen 1f58b:lowerleftfountainpen
1f58c:lowerleftpaintbrush 1f58d:lowerleftcrayon 1f590:raisedhandsfingerssplayed
1f595:reversehandmiddlefinger 1f596:raisedhandpartfingers 1f5a5:desktopcomputer
1f5a8:printer 1f5b1:threebuttonmouse 1f5b2:trackball 1f5bc:framewithpicture
1f5c2:cardindexdividers 1f5c3:cardfilebox 1f5c4:filecabinet 1f5d1:wastebasket
1f5d2:spiralnotepad 1f5d3:spiralcalendarpad 1f5dc:compression 1f5dd:oldkey
1f5de:rolledupnewspaper 1f5e1:daggerknife 1f5e3:speakingheadinsilhouette
1f5e8:leftspeechbubble 1f5ef:rightangerbubble 1f5f3:ballottboxwithballott 1f5fa:worldmap
1f5fb:mountfuji 1f5fc:toykotower 1f5fd:statueofliberty 1f5fe:silhouetteohjapan 1f5ff:moyai
1f600:grin 1f601:grineyes 1f602:grintears 1f603:grinwide 1f604:grinwideeyes 1f605:grinsweat
1f606:grinsquint 1f607:halo 1f608:devilhorns 1f609:winking 1f60a:smileeyes 1f60b:smiletongue
1f60c:relieved 1f60d:hearteyes 1f60e:sunglasses 1f60f:smirk 1f610:neutral
1f611:expressionless 1f612:unamused 1f613:sweat 1f614:pensive 1f615:confused
1f616:confounded 1f617:kiss 1f618:kissing 1f619:kisseyes 1f61a:kissclosedeyes
1f61b:tongueout 1f61c:tongueoutwink 1f61d:tongueoutwink2 1f61e:disappointed 1f61f:worried
1f620:angry 1f621:pouting 1f622:crying 1f623:perservere 1f624:triumph
1f625:dissapointedrelief 1f626:frownmouth 1f627:anguish 1f628:fearful 1f629:weary
1f62a:sleepy 1f62b:tired 1f62c:grimacing 1f62d:loudlycrying 1f62e:openmouth 1f62f:hushed
1f630:coldsweat 1f631:screamfear 1f632:astonished 1f633:flushed 1f634:sleeping
1f635:dizzyface 1f636:nomouth 1f637:medicalmask 1f638:foxgrin 1f639:foxtearofjoy
1f63a:foxsmiling 1f63b:foxheart 1f63c:foxwry 1f63d:foxkissing 1f63e:foxpouting
1f63f:foxcrying 1f640:foxweary 1f641:smallfrown 1f642:smallsmile 1f645:nogesture
1f646:okgesture 1f647:bowing 1f648:monkeysee 1f649:monkeyhear 1f64a:monkeyspeak 1f64b:handup
1f64c:high5 1f64d:frown 1f64e:pout 1f64f:pray 1f680:rocket 1f681:helicopter
1f682:steamlocomotive 1f683:railwaycar 1f684:highspeedtrain 1f685:highspeedtrainbulletnose
1f686:train 1f687:metro 1f688:lightrail 1f689:station 1f68a:tram 1f68b:tramcar 1f68c:bus
1f68d:oncomingbus 1f68e:trolleybus 1f68f:busstop 1f690:minibus 1f691:ambulance
1f692:fireengine 1f693:policecar 1f694:oncomingpolicecar 1f695:taxi 1f696:oncomingtaxi
1f697:automobile 1f698:oncomingautomobile 1f699:recreationalvehicle 1f69a:deliverytruck
1f69b:articulatedlorry 1f69c:tractor 1f69d:monorail 1f69e:mountainrailway
1f69f:suspensionrailway 1f6a0:mountaincableway 1f6a1:aerialtramway 1f6a2:ship 1f6a3:rowboat
1f6a4:speedboat 1f6a5:horizontaltrafficlight 1f6a6:verticaltrafficlight
1f6a7:constructionsign 1f6a8:policecarsrevolvinglight 1f6a9:triangularflagonpost 1f6aa:door
1f6ab:noentrysign 1f6ac:smokingsymbol 1f6ad:nosmokingsymbol 1f6ae:putlitterinitsplacesymbol
1f6af:donotlittersymbol 1f6b0:potablewatersystem 1f6b1:nonpotablewatersymbol 1f6b2:bicycle
1f6b3:nobicycles 1f6b4:bicyclist 1f6b6:walking 1f6b7:nopedestrians 1f6b8:childrencrossing
1f6b9:menssymbol 1f6ba:womenssymbol 1f6bb:restroom 1f6bc:babysymbol 1f6bd:toilet
1f6be:watercloset 1f6bf:shower 1f6c0:bath 1f6c1:bathtub 1f6c2:passportcontrol 1f6c3:customs
1f6c4:baggageclaim 1f6c5:leftluggage 203c:doubleexclaimationmark
2049:exclaimationquestionmark 2139:informationsource 2194:leftrightarrow 2195:updownarrow
2196:northwestarrow 2197:northeastarrow 2198:southeastarrow 21a9:leftwardsarrowwithhook
21aa:rightwardsarrowwithhook 231a:watch 231b:hourglass 23e9:blackrightpointingdoublearrow
23ea:blackleftpointingdoublearrow 23eb:blackuppointingdoublearrow
23ec:blackdownpointingdoublearrow 23f0:alarmclock 23f3:hourglassflowingsand
24c2:circledlatincapitalletterm 25aa:blacksmallsquare 25ab:whitesmallsquare
25b6:blackrightpointingarrow 25c0:blackleftpointingarrow 25fb:whitemediumsquare
25fc:blackmediumsquare 25fd:whitemediumsmallsquare 25fe:blackmediumsmallsquare 2600:sunrays
2601:cloud 260e:blacktelephone 2611:ballotboxwithcheck 2614:umbrellawithraindrops
2615:hotbeverage 261d:index 263a:whitesmilingface 2648:aries 2649:taurus 264a:gemini
264b:cancer 264c:leo 264d:virgo 264e:libra 264f:scorpius 2650:saggitarius 2651:capricorn
2652:aquarius 2653:pisces 2660:blackspadesuit 2663:blackclubsuit 2665:blackheartsuit
2666:blackdiamondsuit 2668:hotsprings 267b:blackuniversalrecyclingsymbol
267f:wheelchairsymbol 2693:anchor 26a0:warningsign 26a1:bolt 26aa:mediumwhitecircle
26ab:mediumblackcircle 26bd:soccerball 26be:baseball 26c4:snowmanwithoutsnow
26c5:sunbehindcloud 26ce:ophiuchus 26d4:noentry 26ea:church 26f2:fountain 26f3:flaginhole
26f5:sailboat 26fa:tent 26fd:fuelpump 2702:blackscissors 2705:whiteheavycheckmark
2708:airplane 2709:envelope 270a:raisedfist 270b:hand 270c:victoryhand 270f:pencil
2712:blacknib 2714:heavycheckmark 2716:heavymultiplicationsymbol 2728:sparkles
2733:eightspokedasterix 2734:eightpointedblackstar 2744:snowflake 274c:crossmark
274e:negativesquaredcrossmark 2753:blackquestionmark 2754:whitequestionmark
2755:whiteexclaimationmark 2757:heavyexclaimationmarksymbol 2764:redheart 2795:heavyplussign
2796:heavyminussign 2797:heavydivisionsign 27a1:blackrightwardsarrow 27b0:curlyloop
27bf:doublecurlyloop 2934:arrowrightwardsupwards 2935:arrowrightwardsdownwards
2b05:leftwardsblackarrow 2b1b:blacklargesquare 2b1c:whitelargesquare 2b50:whitemediumstar
2b55:heavylargecircle 3030:wavydash 303d:partalternationmark
3297:circledideographcongratulation 3299:circledideographsecret
""".split())

# Renders each job [svg, png] with resvg; prints the SVGs that resvg could not render.
RENDER_JS = """
const fs = require('fs');
const [pkg, jobsFile] = process.argv.slice(2);
const { initWasm, Resvg } = require(pkg + '/index.js');
(async () => {
  await initWasm(fs.readFileSync(pkg + '/index_bg.wasm'));
  const failed = [];
  for (const [svg, png] of JSON.parse(fs.readFileSync(jobsFile, 'utf8'))) {
    try {
      const resvg = new Resvg(svg, { font: { loadSystemFonts: false } });
      const image = resvg.render();
      fs.writeFileSync(png, image.asPng());
      image.free();
      resvg.free();
    } catch (e) {
      failed.push(png);  // resvg 2.6.2 panics on a few clipped shapes drawn off the canvas
    }
  }
  process.stdout.write(JSON.stringify(failed));
})();
"""


def fetch(package: str, into: Path) -> Path:
    """`npm pack` the package and unpack it; returns its `package/` folder."""
    out = subprocess.run(["npm", "pack", package, "--silent"], cwd=into, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    dest = into / package.replace("@", "-").replace("/", "-")
    dest.mkdir()
    with tarfile.open(into / out) as tar:
        tar.extractall(dest, filter="data")
    return dest / "package"


def second_caption(entry: dict, emojibase: dict[str, dict]) -> str:
    hexcode = entry["unified"].replace("-FE0F", "")
    base = emojibase.get(hexcode)
    if base is None:
        return entry["name"].lower() + ": " + ", ".join(entry["short_names"]).replace("_", " ")
    tags = base.get("tags") or []
    return base["label"] + (": " + ", ".join(tags) if tags else "")


def record(entry: dict, image: str, emojibase: dict[str, dict]) -> dict:
    return {
        "image": image,
        "caption": [entry["name"].lower(), second_caption(entry, emojibase)],
        "image_id": entry["unified"].lower(),
    }


def slug(text: str) -> str:
    """Iconify's spelling of a name: "Côte d’Ivoire" -> "cote-d-ivoire"."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def icon_names(entry: dict, emojibase: dict[str, dict], chars: dict[str, str],
               style: str) -> tuple[list[str], list[str]]:
    """The names an Iconify set may give the emoji: (exact names, older spellings)."""
    unified = entry["unified"].lower()
    if style == "fxemoji":
        name = FXEMOJI_NAMES.get(unified.replace("-fe0f", ""))
        return ([name] if name else []), []
    exact = [chars[cp] for cp in dict.fromkeys((unified, unified.replace("-fe0f", ""))) if cp in chars]
    base = emojibase.get(entry["unified"].replace("-FE0F", ""))
    if base:
        exact.append(slug(base["label"]))
    older = []
    if base:
        label = base["label"].replace("&", "and")
        undotted = re.sub(r"[.'\u2019]", "", label)
        flag = re.match(r"flag: (.*)", label)
        if flag:  # "flag: Myanmar (Burma)" -> "flag-for-myanmar"
            country = flag.group(1)
            for spelling in (country, re.sub(r"\s*\(.*?\)", "", country), re.sub(r"[.'\u2019]", "", country)):
                older += ["flag-for-" + slug(spelling), "flag-" + slug(spelling)]
        older += [slug(re.sub(r"\s*\(.*?\)", "", label)), slug(undotted)]
    older.append(slug(entry["name"]))  # the Unicode name: "cat face with tears of joy"
    for name in exact:
        if "flag" in name:  # "white-flag" -> "flag-for-white-flag"
            older.append("flag-for-" + name)
        if re.search(r"(^|-)cat(-|$)", name) and "cat-face" not in name:  # "crying-cat" -> "crying-cat-face"
            older.append(re.sub(r"(^|-)cat(-|$)", r"\1cat-face\2", name))
    exact = list(dict.fromkeys(exact))
    return exact, [n for n in dict.fromkeys(older) if n not in exact]


def match_icons(chosen: list[dict], names: dict[str, tuple[list[str], list[str]]],
                available: set[str]) -> dict[str, str]:
    """unified -> icon name. Exact names first; an older spelling only for an icon that is no
    emoji's exact name (an old name can be another emoji's new one). An icon claimed by two
    emoji goes to neither."""
    exact_names = {n for exact, _ in names.values() for n in exact}
    found = {}
    for tier in (0, 1):
        claims: dict[str, list[str]] = {}
        for e in chosen:
            u = e["unified"]
            if u in found:
                continue
            for n in names[u][tier]:
                if n in available and (tier == 0 or n not in exact_names):
                    claims.setdefault(n, []).append(u)
                    break
        taken = set(found.values())
        found.update({us[0]: n for n, us in claims.items() if len(us) == 1 and n not in taken})
    return found


def icon_svg(data: dict, name: str, margin: float) -> str:
    """The Iconify icon (an alias resolved, its flips and rotation applied) as a standalone
    ICON_SIZE x ICON_SIZE SVG, `margin` of its box cut off on each side."""
    box, hflip, vflip, rotate = {}, False, False, 0
    aliases, icons = data.get("aliases", {}), data["icons"]
    while True:
        item = aliases.get(name) or icons[name]
        for k in ("left", "top", "width", "height"):
            if k in item:
                box.setdefault(k, item[k])
        hflip ^= bool(item.get("hFlip"))
        vflip ^= bool(item.get("vFlip"))
        rotate += item.get("rotate", 0)
        if name in icons:
            break
        name = item["parent"]
    body = icons[name]["body"]
    defaults = {"left": 0, "top": 0, "width": 16, "height": 16}
    left, top, width, height = (box.get(k, data.get(k, defaults[k])) for k in ("left", "top", "width", "height"))
    if hflip and vflip:
        rotate += 2
    transforms = []
    if hflip != vflip:
        transforms = [f"translate({2 * left + width} 0) scale(-1 1)" if hflip
                      else f"translate(0 {2 * top + height}) scale(1 -1)"]
    cx, cy = left + width / 2, top + height / 2
    if rotate % 4:
        transforms.insert(0, f"rotate({90 * (rotate % 4)} {cx} {cy})")
        if rotate % 2:  # the box turns about its centre
            left, top, width, height = cx - height / 2, cy - width / 2, height, width
    if transforms:
        body = f'<g transform="{" ".join(transforms)}">{body}</g>'
    view = (left + margin * width, top + margin * height, width * (1 - 2 * margin), height * (1 - 2 * margin))
    return ('<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'width="{ICON_SIZE}" height="{ICON_SIZE}" viewBox="{" ".join(f"{v:g}" for v in view)}">{body}</svg>')


def rasterize(jobs: list[tuple[str, Path]], resvg: Path, tmp: Path) -> set[str]:
    """Renders each (svg, png) job; returns the pngs that could not be rendered."""
    (tmp / "jobs.json").write_text(json.dumps([(svg, str(png)) for svg, png in jobs]))
    (tmp / "render.js").write_text(RENDER_JS)
    out = subprocess.run(["node", str(tmp / "render.js"), str(resvg), str(tmp / "jobs.json")],
                         check=True, capture_output=True, text=True).stdout
    return set(json.loads(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vlp", default="target/release/vlp")
    ap.add_argument("--out", default="shards", type=Path)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--styles", nargs="+", choices=STYLES, default=list(STYLES),
                    help="styles to build (default: all); the tokenizer comes with google")
    args = ap.parse_args()
    styles = [s for s in STYLES if s in args.styles]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pkgs = {name: fetch(spec, tmp) for name, spec in PACKAGES.items()
                if name not in STYLES or name in styles or name == "google"}
        iconify = [s for s in styles if s in ICONIFY_STYLES]
        if iconify:
            for spec in dict.fromkeys([RESVG, FLUENT_FLAT] + [ICONIFY_STYLES[s][0] for s in iconify]):
                pkgs[spec] = fetch(spec, tmp)
        emoji = json.loads((pkgs["google"] / "emoji.json").read_text())
        emojibase = {e["hexcode"]: e for e in json.loads((pkgs["emojibase"] / "en" / "data.json").read_text())}
        chosen = sorted((e for e in emoji if all(e.get(f"has_img_{s}") for s in STYLES_WITH_IMAGES)),
                        key=lambda e: e["unified"])
        print(f"{len(chosen)} emoji with an image in every style")
        shards = {}
        for style in styles:
            if style in ICONIFY_STYLES:
                spec, margin = ICONIFY_STYLES[style]
                data = json.loads((pkgs[spec] / "icons.json").read_text())
                chars = json.loads((pkgs[FLUENT_FLAT] / "chars.json").read_text())
                names = {e["unified"]: icon_names(e, emojibase, chars, style) for e in chosen}
                found = match_icons(chosen, names, set(data["icons"]) | set(data.get("aliases", {})))
                root = tmp / "render"
                (root / style).mkdir(parents=True)
                jobs = [(icon_svg(data, found[e["unified"]], margin), root / style / f"{found[e['unified']]}.png")
                        for e in chosen if e["unified"] in found]
                failed = rasterize(jobs, pkgs[RESVG], tmp)
                records = [record(e, f"{style}/{found[e['unified']]}.png", emojibase) for e in chosen
                           if e["unified"] in found and str(root / style / f"{found[e['unified']]}.png") not in failed]
                print(f"{style}: {len(records)} of {len(chosen)} emoji ({len(found)} found in {spec}, "
                      f"{len(failed)} not rendered)")
            else:
                root = pkgs[style]
                records = [record(e, f"img/{style}/64/{e['image']}", emojibase) for e in chosen]
            ann = tmp / f"{style}.json"
            ann.write_text(json.dumps(records))
            prefix = args.out / f"emoji-{style}"
            # The same seed shuffles every style that holds all the emoji identically, so shard k
            # of google and of twitter hold the same emoji.
            subprocess.run([args.vlp, "shards", "write", "--json", str(ann), "--image-root", str(root),
                            "--out", str(prefix), "--per-shard", str(args.per_shard), "--format", "png",
                            "--shuffle-seed", str(args.seed)], check=True)
            last = (len(records) - 1) // args.per_shard
            shards[style] = f"{prefix}-{{000000..{last:06d}}}.tar"
        if "google" in shards:
            subprocess.run([args.vlp, "tokenizer", "train", shards["google"], "--out",
                            str(args.out / "emoji-tokenizer.json"), "--vocab-size", "2000"], check=True)
        for style, pattern in shards.items():
            print(f"{style}: {pattern}")


if __name__ == "__main__":
    main()
